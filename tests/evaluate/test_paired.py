"""Paired AUROC differences: one patient resample for both systems (respiramfm.evaluate.paired)."""

from __future__ import annotations

import numpy as np
import pytest

from respiramfm.evaluate.metrics import auroc, bootstrap_auroc
from respiramfm.evaluate.paired import bootstrap_auroc_difference, differences_markdown


def _data(n_patients: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"p{i}" for i in range(n_patients)], 2)  # two records per patient
    y = np.repeat(rng.integers(0, 2, n_patients), 2)
    good = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.25, len(y)), 0, 1)
    weak = np.clip(0.5 + 0.1 * (2 * y - 1) + rng.normal(0, 0.25, len(y)), 0, 1)
    return y, good, weak, patients


def test_a_system_against_itself_is_exactly_zero():
    y, good, _, patients = _data()
    d = bootstrap_auroc_difference(y, good, good, patients, n_boot=300)
    assert d.diff == 0.0 and (d.ci_low, d.ci_high) == (0.0, 0.0) and d.n_boot == 300
    seeds = np.stack([good, good[::-1]])  # seeds as rows: still the same predictions on both sides
    d = bootstrap_auroc_difference(y, seeds, seeds, patients, n_boot=300)
    assert (d.diff, d.ci_low, d.ci_high) == (0.0, 0.0, 0.0)


def test_two_prediction_sets_interval_covers_their_difference_and_is_paired():
    y, good, weak, patients = _data()
    d = bootstrap_auroc_difference(y, good, weak, patients, n_boot=500)
    assert d.diff == pytest.approx(auroc(y, good)[0] - auroc(y, weak)[0])
    assert d.ci_low <= d.diff <= d.ci_high and d.ci_low > 0  # the stronger scorer is resolved as stronger
    assert d.n == len(y) and d.n_patients == 60 and d.n_pos == int(y.sum())
    # pairing: narrower than the difference of two independent intervals would suggest
    a, b = (bootstrap_auroc(y, p, patients, n_boot=500) for p in (good, weak))
    assert d.ci_high - d.ci_low < (a.ci_high - a.ci_low) + (b.ci_high - b.ci_low)
    # seeds are averaged per side, as in the main table
    two = bootstrap_auroc_difference(y, np.stack([good, weak]), weak, patients, n_boot=200)
    assert two.diff == pytest.approx((auroc(y, good)[0] + auroc(y, weak)[0]) / 2 - auroc(y, weak)[0])


def test_undefined_difference_says_why():
    y = np.zeros(10, dtype=int)
    d = bootstrap_auroc_difference(y, np.linspace(0, 1, 10), np.linspace(1, 0, 10), [f"p{i}" for i in range(10)])
    assert np.isnan(d.diff) and "one class" in d.reason
    with pytest.raises(ValueError):
        bootstrap_auroc_difference([0, 1], [0.1, 0.9], [0.2], ["a", "b"])


def test_differences_markdown_table():
    row = {"task": "T1", "system": "audio_only", "reference": "respiramfm", "diff": -0.05, "ci_low": -0.1,
           "ci_high": 0.01, "n": 40, "n_pos": 12, "reason": ""}
    md = differences_markdown({"differences": [row], "systems": ["respiramfm", "audio_only"], "tasks": ["T1"],
                               "n_boot": 100})
    assert "| T1 | 40 (12) | -0.050 [-0.100, +0.010] |" in md and "paired CI" in md
    assert differences_markdown({"differences": [], "systems": ["audio_only"], "tasks": ["T1"], "n_boot": 1}) == ""
