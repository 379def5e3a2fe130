"""Text-only COVID check on the real Coswara / Coughvid metadata (subsampled, fixed seed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from respiramfm.errors import DataError
from respiramfm.evaluate.textcheck import load_labelled, run_textcheck, symptom_flags


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_labels_and_flags_from_real_metadata(shared_data):
    recs, y = load_labelled(shared_data, "coughvid")
    assert len(y) == 6175 and int(y.sum()) == 547  # the OPERA COVID task: cough_detected >= 0.8, covid vs healthy
    recs, y = load_labelled(shared_data, "coswara", max_records=100, seed=1)
    again, y2 = load_labelled(shared_data, "coswara", max_records=100, seed=1)
    assert [r.record_id for r in recs] == [r.record_id for r in again] and len(recs) == 100
    x, vocab = symptom_flags(recs)
    assert x.shape == (100, len(vocab)) and set(np.unique(x)) <= {0.0, 1.0}
    assert any(v.startswith("symptom:") and "none" not in v for v in vocab)
    # a phrase unseen in the vocabulary is ignored, never a new column
    x2, _ = symptom_flags(recs[:3], vocab=vocab[:2])
    assert x2.shape == (3, 2)
    with pytest.raises(DataError):
        load_labelled(shared_data, "icbhi")


def test_text_only_paths_beat_chance_on_coswara(shared_data, tmp_path, smollm2):
    res = run_textcheck(shared_data, out=tmp_path / "tc.json", datasets=("coswara",), max_records=200, seed=0,
                        n_boot=200, backbone_obj=smollm2)
    d = res["datasets"]["coswara"]
    assert d["n_train"] + d["n_test"] == 200 and d["split"].startswith("patient-level")
    for key in ("llm_text_lr", "symptom_flags_lr"):
        r = d[key]
        assert r["ci_low"] <= r["auroc"] <= r["ci_high"]
    assert d["symptom_flags_lr"]["auroc"] > 0.75 and d["llm_text_lr"]["auroc"] > 0.6
    saved = json.loads((tmp_path / "tc.json").read_text())
    assert saved["simulated"] is False and math.isfinite(saved["datasets"]["coswara"]["llm_text_lr"]["auroc"])
