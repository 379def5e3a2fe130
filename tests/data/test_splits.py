"""Patient-level splits: official splits kept, val carved from train, no leakage, determinism."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from respiramfm.data.datasets import load_icbhi
from respiramfm.data.records import Record
from respiramfm.data.splits import assign_splits, check_no_leakage, split_summary
from respiramfm.errors import DataError


def _cohort(n_patients=200, per=3, dataset="d", split=""):
    recs = []
    for p in range(n_patients):
        diag = "copd" if p % 4 == 0 else "healthy"
        for k in range(per):
            recs.append(Record(f"{dataset}/{p}/{k}", f"{dataset}/{p}", dataset, diagnosis=diag, split=split))
    return recs


def _patient_splits(recs):
    out = defaultdict(set)
    for r in recs:
        out[(r.dataset, r.patient_id)].add(r.split)
    return out


def test_fractions_and_stratification():
    recs = assign_splits(_cohort(), seed=3)
    per_patient = _patient_splits(recs)
    assert all(len(s) == 1 for s in per_patient.values())
    counts = Counter(next(iter(s)) for s in per_patient.values())
    assert counts == {"train": 140, "val": 20, "test": 40}
    copd = Counter(r.split for r in recs if r.diagnosis == "copd" and r.record_id.endswith("/0"))
    assert copd == {"train": 35, "val": 5, "test": 10}


def test_deterministic_and_seed_dependent():
    a = [r.split for r in assign_splits(_cohort(), seed=1)]
    b = [r.split for r in assign_splits(_cohort(), seed=1)]
    c = [r.split for r in assign_splits(_cohort(), seed=2)]
    assert a == b and a != c


def test_input_untouched_and_order_kept():
    recs = _cohort(10)
    out = assign_splits(recs)
    assert [r.record_id for r in out] == [r.record_id for r in recs]
    assert all(r.split == "" for r in recs)


def test_official_test_kept_val_carved_from_train():
    recs = []
    for p in range(100):
        split = "test" if p < 30 else "train"
        recs += [Record(f"r{p}_{k}", f"p{p}", "d", diagnosis="copd" if p % 2 else "healthy", split=split)
                 for k in range(2)]
    out = assign_splits(recs, fractions=(0.7, 0.1, 0.2), seed=0)
    assert {r.patient_id for r in out if r.split == "test"} == {f"p{p}" for p in range(30)}
    val = {r.patient_id for r in out if r.split == "val"}
    assert len(val) == 9  # 70 official train patients x 0.1 / 0.8, rounded
    assert all(int(p[1:]) >= 30 for p in val)
    check_no_leakage(out)
    assert [r.split for r in assign_splits(recs, keep_existing=False, seed=0)] != [r.split for r in out]


def test_unassigned_patients_dealt_alongside_official_split():
    recs = _cohort(20, split="test") + _cohort(40, dataset="e")
    recs += [Record("d/new", "d/new", "d", diagnosis="copd")]
    out = assign_splits(recs, seed=0)
    assert {r.split for r in out if r.dataset == "d" and r.record_id != "d/new"} == {"test"}
    assert next(r for r in out if r.record_id == "d/new").split in ("train", "val", "test")
    assert Counter(r.split for r in out if r.dataset == "e" and r.record_id.endswith("/0")) == {
        "train": 28, "val": 4, "test": 8}


def test_icbhi_official_split_kept(shared_data):
    recs = assign_splits(load_icbhi(shared_data / "icbhi").records)
    assert {r.patient_id: r.split for r in recs} == {"icbhi/101": "test", "icbhi/102": "test",
                                                     "icbhi/103": "train", "icbhi/104": "test"}
    assert split_summary(recs) == {"test": {"copd": 6, "healthy": 1, "urti": 2}, "train": {"asthma": 1}}


def test_check_no_leakage_names_patients():
    recs = [Record("a", "p1", "d", split="train"), Record("b", "p1", "d", split="test"),
            Record("c", "p2", "d", split="train"), Record("d", "p3", "d", split="val"),
            Record("e", "p3", "d", split="test"), Record("f", "p1", "other", split="test")]
    with pytest.raises(DataError, match=r"2 patient\(s\) appear in more than one split: p1 \(d\) in test\+train; "
                                        r"p3 \(d\) in test\+val"):
        check_no_leakage(recs)
    with pytest.raises(DataError, match="more than one split"):
        assign_splits(recs)
    check_no_leakage(recs[2:4])


def test_bad_arguments():
    with pytest.raises(ValueError):
        assign_splits(_cohort(2), fractions=(0.5, 0.5))
    with pytest.raises(ValueError):
        assign_splits(_cohort(2), stratify_by="colour")
    with pytest.raises(DataError, match="without patient_id"):
        assign_splits([Record("a", "", "d")])


patients = st.lists(st.tuples(st.sampled_from(["d", "e"]), st.integers(0, 30),
                              st.sampled_from(["copd", "healthy", "asthma", ""]),
                              st.sampled_from(["", "", "train", "test", "val"])), min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(rows=patients, seed=st.integers(0, 10**6),
       fractions=st.tuples(*[st.floats(0, 1)] * 3).filter(lambda f: sum(f) > 0.05))
def test_split_properties(rows, seed, fractions):
    # one existing split per patient (the input must itself be leak-free to keep it)
    first: dict = {}
    recs = []
    for i, (ds, p, diag, split) in enumerate(rows):
        split = first.setdefault((ds, p), split)
        recs.append(Record(f"r{i}", f"p{p}", ds, diagnosis=diag, split=split))
    out = assign_splits(recs, fractions=fractions, seed=seed)
    check_no_leakage(out)
    assert all(r.split in ("train", "val", "test") for r in out)
    assert [r.split for r in out] == [r.split for r in assign_splits(recs, fractions=fractions, seed=seed)]
    for a, b in zip(recs, out):
        if a.split == "test" or (a.split == "val"):
            assert b.split == a.split  # official test/val never move
        if a.split == "train":
            assert b.split in ("train", "val")
