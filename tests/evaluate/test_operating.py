"""Operating points, calibration and thresholds (evaluate/operating.py), checked against direct computation."""

from __future__ import annotations

import csv
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from respiramfm.errors import ConfigError
from respiramfm.evaluate.operating import (POINTS, ThresholdConfig, at_threshold, choose_threshold,
                                           operating_points, operating_table, reliability_bins)


def _data(n=120, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.round(np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1), 2)  # ties on purpose
    patients = [f"P{i // 3}" for i in range(n)]                     # three records per patient
    return y, p, patients


def _direct(y, p):
    """Every operating point by enumerating thresholds one by one."""
    best = {"sens_at_spec90": 0.0, "sens_at_spec95": 0.0, "spec_at_sens90": 0.0}
    for t in [*np.unique(p), np.inf]:
        d = p >= t
        sens, spec = (d & (y == 1)).sum() / (y == 1).sum(), (~d & (y == 0)).sum() / (y == 0).sum()
        if spec >= 0.9:
            best["sens_at_spec90"] = max(best["sens_at_spec90"], sens)
        if spec >= 0.95:
            best["sens_at_spec95"] = max(best["sens_at_spec95"], sens)
        if sens >= 0.9:
            best["spec_at_sens90"] = max(best["spec_at_sens90"], spec)
    bins = np.clip((p * 10).astype(int), 0, 9)
    best["ece"] = sum(abs(y[bins == k].sum() - p[bins == k].sum()) for k in range(10)) / len(y)
    best["brier"] = float(((p - y) ** 2).mean())
    return best


def test_points_equal_direct_computation_and_have_patient_cis():
    y, p, patients = _data()
    op = operating_points(y, p, patients, n_boot=400, seed=3)
    for k, v in _direct(y, p).items():
        assert op[k]["value"] == pytest.approx(v, abs=1e-12), k
        assert op[k]["ci_low"] <= op[k]["value"] <= op[k]["ci_high"], k
    assert op["n_patients"] == 40 and op["n_boot"] == 400 and op["ece_bins"] == 10
    assert operating_points(y, p, patients, n_boot=400, seed=3) == op  # seeded


def test_bootstrap_resamples_patients_not_records():
    """A patient's records move together: duplicating every record per patient widens the interval."""
    y, p, _ = _data(60)
    rec = operating_points(np.repeat(y, 4), np.repeat(p, 4), None, n_boot=300)
    pat = operating_points(np.repeat(y, 4), np.repeat(p, 4), np.repeat(np.arange(60).astype(str), 4), n_boot=300)
    def width(op):
        return op["brier"]["ci_high"] - op["brier"]["ci_low"]

    assert width(pat) > 1.5 * width(rec)


def test_weighted_replicate_equals_explicit_resample():
    """One bootstrap replicate as weights gives the same numbers as the data resampled explicitly."""
    from respiramfm.evaluate.operating import _weighted

    y, p, _ = _data(50)
    counts = np.random.default_rng(0).multinomial(50, np.full(50, 1 / 50)).astype(float)
    got = _weighted(y, p, counts[None])
    idx = np.repeat(np.arange(50), counts.astype(int))
    want = _direct(y[idx], p[idx])
    for k in POINTS:
        assert got[k][0] == pytest.approx(want[k], abs=1e-12), k


def test_one_class_leaves_sensitivity_undefined_but_calibration_defined():
    op = operating_points([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.9], ["a", "b", "c", "d"], n_boot=50)
    assert np.isnan(op["sens_at_spec90"]["value"]) and "one class" in op["reason"]
    assert op["brier"]["value"] == pytest.approx((0.01 + 0.04 + 0.09 + 0.81) / 4)


def test_reliability_bins():
    bins = reliability_bins([0, 1, 1, 0], [0.05, 0.15, 0.95, 1.0], bins=10)
    assert bins[0]["n"] == 1 and bins[1]["frac_pos"] == 1.0 and bins[9]["n"] == 2 and bins[9]["frac_pos"] == 0.5
    assert sum(b["n"] for b in bins) == 4


def test_thresholds_youden_and_target_sensitivity():
    y = [0, 0, 0, 0, 1, 0, 1, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9]
    yd = choose_threshold(y, p)
    assert yd["threshold"] == 0.6 and yd["val_sensitivity"] == 0.8 and yd["val_specificity"] == 1.0
    s = choose_threshold(y, p, "sensitivity", 1.0)
    assert s["threshold"] == 0.45 and s["val_sensitivity"] == 1.0 and s["val_specificity"] == 0.8
    assert at_threshold(y, p, s["threshold"])["specificity"] == 0.8
    with pytest.raises(ValueError, match="one class"):
        choose_threshold([1, 1], [0.2, 0.3])
    with pytest.raises(ConfigError, match="threshold.rule"):
        ThresholdConfig(rule="f1").validate()


class _Task:
    def __init__(self, name, role):
        self.name, self.role, self.dataset, self.simulated = name, role, "simds", True

    def select(self, records):
        return [(r, r.label) for r in records if r.task == self.name]


def test_tables_and_report_show_operating_points(tmp_path):
    from respiramfm.evaluate.report import build_report
    from respiramfm.evaluate.results import summarise, write_tables

    y, p, patients = _data(40)
    (tmp_path / "predictions" / "respiramfm").mkdir(parents=True)
    rows = [f"r{i},{patients[i]},T1,{y[i]},{p[i]}" for i in range(40)]
    (tmp_path / "predictions" / "respiramfm" / "seed0.csv").write_text(
        "record_id,patient,task,label,prob\n" + "\n".join(rows) + "\n")
    recs = [SimpleNamespace(record_id=f"r{i}", task="T1", label=int(y[i])) for i in range(40)]
    data = SimpleNamespace(tasks={"T1": _Task("T1", "supervised")}, split=lambda s: recs, simulated=True)
    _saved_model_with_threshold(tmp_path / "work" / "respiramfm" / "seed0" / "finetune" / "model", 0.5)
    summary = summarise(tmp_path, data, ["respiramfm"], [0], n_boot=200)
    op = summary["rows"][0]["operating"]
    at = summary["rows"][0]["at_val_threshold"]  # the saved model's validation threshold, applied to test
    d = p >= 0.5
    assert at["thresholds"] == [0.5] and at["rule"] == "youden"
    assert at["sensitivity"] == pytest.approx((d & (y == 1)).sum() / (y == 1).sum())
    assert at["specificity"] == pytest.approx((~d & (y == 0)).sum() / (y == 0).sum())
    assert op["sens_at_spec90"]["value"] == pytest.approx(_direct(y, p)["sens_at_spec90"])
    write_tables(tmp_path, summary)
    md = (tmp_path / "results.md").read_text()
    assert "## Operating points" in md and "| T1 | respiramfm | 40 (" in md and "ECE (10 bins)" in md
    row = next(csv.DictReader((tmp_path / "results.csv").open()))
    assert float(row["brier"]) == pytest.approx(_direct(y, p)["brier"]) and row["ece_ci_low"]
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["operating"]["n_patients"] == 14
    shutil.rmtree(tmp_path / "work")  # the report would draw attention examples from a kept model
    page = build_report(tmp_path).read_text()
    assert "<h2>Operating points</h2>" in page and (tmp_path / "figures" / "reliability_T1.png").is_file()
    assert len(re.findall(r"data:image/png;base64,", page)) == 2  # ROC + reliability
    assert "Sens @ 90% spec" in operating_table(summary)
    assert f"| {at['sensitivity']:.3f} / {at['specificity']:.3f} (youden) |" in md
    assert float(row["val_threshold_sensitivity"]) == pytest.approx(at["sensitivity"])


def _saved_model_with_threshold(directory, threshold: float) -> None:
    """A tiny saved stage-2 model whose config.json records a T1 threshold chosen on validation."""
    import torch

    from respiramfm.models.configuration import FusionConfig, ProjectorConfig
    from respiramfm.models.fusion import RespiraMFM
    from respiramfm.models.projector import build_projector

    torch.manual_seed(0)
    model = RespiraMFM(FusionConfig(backbone="tiny-llama"), build_projector(ProjectorConfig(in_dim=8, out_dim=64)))
    model.thresholds = {"T1": {"threshold": threshold, "rule": "youden", "target": None, "val_sensitivity": 1.0,
                               "val_specificity": 1.0, "n_val": 4, "n_val_pos": 2}}
    model.save_pretrained(directory)
