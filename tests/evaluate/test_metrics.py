"""AUROC, patient-level bootstrap and seed aggregation."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from respiramfm.evaluate.metrics import _weighted_auroc, auroc, bootstrap_auroc, format_mean_std, mean_std, task_counts


def test_auroc_hand_computed():
    # positives 0.8, 0.4; negatives 0.5, 0.1, 0.4 -> pairs: (0.8>0.5,0.1,0.4)=3, (0.4>0.1)=1, (0.4=0.4)=0.5
    y = [1, 1, 0, 0, 0]
    p = [0.8, 0.4, 0.5, 0.1, 0.4]
    value, reason = auroc(y, p)
    assert reason == "" and value == pytest.approx(4.5 / 6)


def test_auroc_undefined_cases_give_nan_and_reason():
    v, r = auroc([1, 1, 1], [0.1, 0.2, 0.3])
    assert math.isnan(v) and "one class" in r and "positive only" in r
    v, r = auroc([], [])
    assert math.isnan(v) and r == "no samples"
    v, r = auroc([0, 1], [0.2, float("nan")])
    assert math.isnan(v) and "non-finite" in r
    with pytest.raises(ValueError):
        auroc([0, 1], [0.5])
    res = bootstrap_auroc([0, 0, 0], [0.1, 0.2, 0.3], n_boot=50)
    assert math.isnan(res.auroc) and math.isnan(res.ci_low) and res.n_boot == 0 and res.reason


def test_weighted_auroc_equals_sklearn_on_explicit_resample():
    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 2, n)
    p = np.round(rng.random(n), 1)  # many ties
    counts = rng.integers(0, 4, size=(5, n)).astype(float)
    got = _weighted_auroc(y, p, counts)
    for b in range(5):
        idx = np.repeat(np.arange(n), counts[b].astype(int))
        assert got[b] == pytest.approx(roc_auc_score(y[idx], p[idx]), abs=1e-12)


def test_ci_contains_point_and_is_seeded():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = y * 0.5 + rng.random(300)
    a = bootstrap_auroc(y, p, n_boot=500, seed=3)
    b = bootstrap_auroc(y, p, n_boot=500, seed=3)
    c = bootstrap_auroc(y, p, n_boot=500, seed=4)
    assert a.ci_low < a.auroc < a.ci_high and a.n_boot == 500
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high) and (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert (a.n, a.n_pos, a.n_patients) == (300, int(y.sum()), 300)


def test_patient_resampling_widens_interval_when_patients_have_many_records():
    # 40 patients x 10 near-identical records: the records carry one patient's worth of information
    rng = np.random.default_rng(2)
    py = rng.integers(0, 2, 40)
    pscore = py * 0.3 + rng.random(40)
    y = np.repeat(py, 10)
    p = np.repeat(pscore, 10) + rng.normal(0, 1e-3, 400)
    patients = np.repeat([f"p{i}" for i in range(40)], 10)
    rec = bootstrap_auroc(y, p, None, n_boot=400, seed=0)
    pat = bootstrap_auroc(y, p, patients, n_boot=400, seed=0)
    assert pat.auroc == rec.auroc and pat.n_patients == 40 and rec.n_patients == 400
    assert (pat.ci_high - pat.ci_low) > 2 * (rec.ci_high - rec.ci_low)


def test_bootstrap_is_vectorised_fast():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 1000)
    p = rng.random(1000)
    patients = rng.integers(0, 300, 1000).astype(str)
    t0 = time.perf_counter()
    res = bootstrap_auroc(y, p, patients, n_boot=1000, seed=0)
    assert time.perf_counter() - t0 < 10  # generous on a shared 2-core box; a loop over sklearn takes longer
    assert res.n_boot == 1000 and res.ci_low < 0.5 < res.ci_high


def test_one_patient_or_rare_class_has_no_interval():
    res = bootstrap_auroc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], ["a"] * 4, n_boot=100)
    assert res.auroc == 1.0 and math.isnan(res.ci_low) and "one patient" in res.reason
    # one positive among 200 patients: most replicates lose it
    y = np.zeros(200, int)
    y[0] = 1
    res = bootstrap_auroc(y, np.linspace(0, 1, 200), n_boot=200, seed=0)
    assert math.isfinite(res.auroc)
    assert res.n_boot < 200


def test_mean_std_and_counts():
    assert mean_std([0.7, 0.8, 0.9]) == pytest.approx((0.8, 0.1, 3))
    assert mean_std([0.5, float("nan")]) == (0.5, 0.0, 1)
    m, s, k = mean_std([])
    assert math.isnan(m) and k == 0
    assert task_counts([1, 0, 1], ["a", "a", "b"]) == {"n": 3, "n_pos": 2, "n_patients": 2}
    assert format_mean_std(0.81234, 0.01) == "0.812 ± 0.010" and format_mean_std(math.nan, 0) == "–"


def test_bootstrap_of_seed_mean():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    p1 = y * 0.4 + rng.random(200)
    p2 = y * 0.8 + rng.random(200)
    both = bootstrap_auroc(y, np.stack([p1, p2]), n_boot=300, seed=1)
    assert both.auroc == pytest.approx((auroc(y, p1)[0] + auroc(y, p2)[0]) / 2)
    assert both.ci_low < both.auroc < both.ci_high
