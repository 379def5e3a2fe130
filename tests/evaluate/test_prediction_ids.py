"""Prediction files name each patient once (``kauh/P100``), and validation reports balanced accuracy
at the Youden threshold instead of accuracy at 0.5 (issue: "always COPD" scored 0.578)."""

from __future__ import annotations

import numpy as np

from respiramfm.data.records import Record
from respiramfm.data.splits import patient_label
from respiramfm.data.tasks import get_task
from respiramfm.evaluate.predictions import read_predictions, write_predictions
from respiramfm.fusion.infer import youden_balanced_accuracy


class _Data:
    def __init__(self, records):
        self.records, self.tasks = records, {"T7": get_task("T7")}

    def split(self, name):
        return [r for r in self.records if r.split == name]


def test_prediction_file_names_the_dataset_once(tmp_path):
    recs = [Record("kauh/BP100", "kauh/P100", "kauh", audio_type="lung", diagnosis="copd", split="test"),
            Record("kauh/DP7", "P7", "kauh", audio_type="lung", diagnosis="healthy", split="test")]
    n = write_predictions(tmp_path / "p.csv", _Data(recs), {"T7": {"kauh/BP100": 0.9, "kauh/DP7": 0.2}}, "x")
    rows = {r["record_id"]: r["patient"] for r in read_predictions(tmp_path / "p.csv")}
    assert n == 2
    assert rows == {"kauh/BP100": "kauh/P100", "kauh/DP7": "kauh/P7"}
    assert patient_label(recs[0]) == "kauh/P100"


def test_validation_balanced_accuracy_is_not_the_majority_share():
    # 58 % positives, perfectly ranked but every probability above 0.5: accuracy at 0.5 would be 0.58
    y = np.array([1] * 58 + [0] * 42)
    probs = np.where(y == 1, 0.95, 0.7)
    tasks = np.array(["T7"] * 100)
    assert ((probs >= 0.5) == y).mean() == 0.58
    assert youden_balanced_accuracy(y, probs, tasks) == 1.0
    # an uninformative score gives 0.5, and a one-class task is left out
    flat = np.full(100, 0.6)
    assert youden_balanced_accuracy(y, flat, tasks) == 0.5
    assert youden_balanced_accuracy(np.ones(4, int), np.full(4, 0.9), np.array(["A"] * 4)) is None
