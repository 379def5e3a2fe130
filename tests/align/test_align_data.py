"""Patient-level train/val selection, text ids, retrieval/geometry metrics and the t-SNE figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from respiramfm.align.data import assign_text_ids
from respiramfm.data.splits import split_records
from respiramfm.align.metrics import alignment, retrieval_metrics, uniformity
from respiramfm.data.records import Record
from respiramfm.errors import ConfigError, DataError


def _rec(rid, pid, split, dataset="ds", diagnosis="healthy", context=""):
    return Record(record_id=rid, patient_id=pid, dataset=dataset, audio_path=f"{rid}.wav", split=split,
                  diagnosis=diagnosis, context=context)


def test_manifest_val_is_used_and_test_rows_are_dropped():
    recs = [_rec("a1", "A", "train"), _rec("a2", "A", "train"), _rec("b1", "B", "val"), _rec("c1", "C", "test"),
            _rec("d1", "D", "")]
    train, val, source = split_records(recs, 0.2)
    assert source == "manifest"
    assert [r.record_id for r in train] == ["a1", "a2", "d1"]      # unassigned rows join the training pool
    assert [r.record_id for r in val] == ["b1"]


def test_validation_is_carved_by_patient_when_absent():
    recs = []
    for p in range(20):
        dx = "COPD" if p % 2 else "healthy"
        recs += [_rec(f"p{p}-r{k}", f"p{p}", "train", diagnosis=dx) for k in range(3)]
    recs.append(_rec("t1", "pt", "test"))
    train, val, source = split_records(recs, 0.2)
    assert source == "carved"
    tp, vp = {r.patient_id for r in train}, {r.patient_id for r in val}
    assert not tp & vp and len(vp) == 4 and "pt" not in tp | vp      # whole patients, 20%, never test
    assert {r.diagnosis for r in val} == {"COPD", "healthy"}         # stratified by diagnosis
    assert all(r.split == "val" for r in val)
    again = split_records(recs, 0.2)
    assert [r.record_id for r in again[1]] == [r.record_id for r in val]  # deterministic


def test_leakage_and_bad_settings_are_errors():
    with pytest.raises(DataError, match="more than one split"):
        split_records([_rec("a1", "A", "train"), _rec("a2", "A", "test"), _rec("b", "B", "val")], 0.2)
    with pytest.raises(DataError, match="unassigned records"):
        split_records([_rec("a1", "A", ""), _rec("a2", "A", "test"), _rec("b", "B", "val")], 0.2)
    with pytest.raises(DataError, match="cannot carve"):
        split_records([_rec("a1", "A", "train"), _rec("a2", "A", "train")], 0.2)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_records([_rec("a1", "A", "train"), _rec("b1", "B", "train")], 1.5)
    with pytest.raises(DataError, match="no records of dataset"):
        split_records([_rec("a1", "A", "train")], 0.2, datasets=["other"])


def test_dataset_filter():
    recs = [_rec("a1", "A", "train", "x"), _rec("b1", "B", "val", "x"), _rec("c1", "C", "train", "y")]
    train, val, _ = split_records(recs, 0.2, datasets=["x"])
    assert [r.record_id for r in train + val] == ["a1", "b1"]


def test_text_ids_follow_context_then_vector_bytes():
    text = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 0]], dtype=np.float32)
    ids = assign_text_ids(["same", "same", "other", "", ""], text)
    assert ids.tolist() == [0, 0, 1, 2, 3]
    assert assign_text_ids(["", "", ""], np.array([[1.0], [1.0], [2.0]])).tolist() == [0, 0, 1]


def test_retrieval_over_distinct_texts_counts_duplicates_as_hits():
    # texts: 0 -> e1, 1 -> e2, 2 -> e1 again (same id 0), 3 -> e3
    text = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    ids = torch.tensor([0, 1, 0, 2])
    audio = torch.tensor([[0.9, 0.1, 0.0],    # nearest e1: hit
                          [0.8, 0.6, 0.0],    # true e2 ranked 2nd behind e1
                          [1.0, 0.0, 0.2],    # its text equals e1: hit even though row 0 "owns" the column
                          [0.0, 0.5, 0.4]])   # true e3 2nd behind e2
    m = retrieval_metrics(audio, text, ids, ks=(1, 2))
    assert m["n_distinct_texts"] == 3
    assert m["r1"] == 0.5 and m["r2"] == 1.0
    assert m["chance_r1"] == pytest.approx(1 / 3) and m["chance_r2"] == pytest.approx(2 / 3)
    assert m["mrr"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    assert m["median_rank"] == 1.0


def test_alignment_and_uniformity_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # ‖(0,1) − (1,1)/√2‖² = 2 − √2 for the second pair, 0 for the first
    assert alignment(a, t) == pytest.approx((0 + 2 - math.sqrt(2)) / 2)
    # two orthogonal unit vectors: squared distance 2 -> log exp(-4) = -4
    assert uniformity(a) == pytest.approx(-4.0)
    # antipodal points are maximally uniform for two points: log exp(-2·4) = -8
    assert uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)
    assert math.isnan(uniformity(a[:1]))


def test_tsne_figure_marks_simulated_data_and_scores_clusters(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from respiramfm.align.figures import tsne_before_after

    titles = []
    orig = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **kw: (titles.append(t), orig(self, t, **kw))[1])
    rng = np.random.default_rng(0)
    labels = ["COPD"] * 30 + ["healthy"] * 30
    before = rng.normal(size=(60, 16))
    centers = np.repeat(np.eye(8)[:2] * 5, 30, axis=0)
    after = centers + 0.3 * rng.normal(size=(60, 8))
    scores = tsne_before_after(before, after, labels, tmp_path / "sim.png", simulated=True, threads=1)
    assert scores["silhouette_after"] > 0.5 > abs(scores["silhouette_before"])
    assert (tmp_path / "sim.png").read_bytes()[:4] == b"\x89PNG"
    tsne_before_after(before, after, labels, tmp_path / "real.png", simulated=False, threads=1)
    assert titles[0].startswith("SIMULATED DATA") and not titles[1].startswith("SIMULATED")
    with pytest.raises(ValueError):
        tsne_before_after(before[:3], after[:3], labels[:3], tmp_path / "x.png", simulated=False)
