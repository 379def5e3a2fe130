"""ICBHI adapter on the real shared files: official metadata, 10 recordings, quirks."""

from __future__ import annotations

from collections import Counter

import pytest

from respiramfm.data.datasets import load_icbhi, read_icbhi_official
from respiramfm.data.datasets.icbhi import UNPUBLISHED


@pytest.fixture(scope="module")
def icbhi_root(shared_data):
    return shared_data / "icbhi"


@pytest.fixture(scope="module")
def icbhi(icbhi_root):
    return load_icbhi(icbhi_root)


def test_official_files_parse_without_audio(icbhi_root):
    off = read_icbhi_official(icbhi_root)
    assert len(off.diagnosis) == 126
    assert len(off.demographics) == 126
    assert len(off.split) == 921
    assert Counter(off.split.values()) == {"train": 540, "test": 381}
    counts = off.counts()
    assert counts["split"] == {"train": 539, "test": 381}
    assert counts["diagnosis"] == {"copd": 793, "pneumonia": 37, "healthy": 35, "urti": 23,
                                   "bronchiectasis": 16, "bronchiolitis": 13, "lrti": 2, "asthma": 1}
    assert counts["patients"] == {"copd": 64, "healthy": 26, "urti": 14, "bronchiectasis": 7,
                                  "bronchiolitis": 6, "pneumonia": 6, "lrti": 2, "asthma": 1}
    assert "226_1b1_Pl_sc_Meditron" in off.split and "226_1b1_Pl_sc_Meditron" in UNPUBLISHED
    assert len(off.recordings()) == 920 and len(off.recordings(drop_unpublished=False)) == 921


def test_patient_223_na_is_missing_not_nan(icbhi_root):
    demo = read_icbhi_official(icbhi_root).demographics["223"]
    assert demo.age is None and demo.sex == ""
    demo_101 = read_icbhi_official(icbhi_root).demographics["101"]
    assert (demo_101.age, demo_101.sex, demo_101.child_weight, demo_101.adult_bmi) == (3.0, "female", 19.0, None)


def test_ten_recordings_four_patients(icbhi):
    recs = icbhi.records
    assert len(recs) == 10
    by_patient = {}
    for r in recs:
        by_patient.setdefault(r.patient_id, set()).add(r.diagnosis)
    assert by_patient == {"icbhi/101": {"urti"}, "icbhi/102": {"healthy"}, "icbhi/103": {"asthma"},
                          "icbhi/104": {"copd"}}
    assert all(r.dataset == "icbhi" and r.audio_type == "lung" and r.audio_path.endswith(".wav") for r in recs)


def test_official_split_103_train_rest_test(icbhi):
    splits = {r.record_id: r.split for r in icbhi.records}
    assert splits.pop("icbhi/103_2b2_Ar_mc_LittC2SE") == "train"
    assert set(splits.values()) == {"test"}


def test_location_and_device_per_recording(icbhi):
    r104 = {r.extra["location_code"]: r for r in icbhi.records if r.patient_id == "icbhi/104"}
    assert sorted(r104) == ["Al", "Ar", "Ll", "Lr", "Pl", "Pr"]
    assert r104["Ll"].location == "left lateral chest"
    assert r104["Pr"].location == "right posterior chest"
    assert {r.device for r in r104.values()} == {"Litt3200"}
    r103 = next(r for r in icbhi.records if r.patient_id == "icbhi/103")
    assert (r103.device, r103.location, r103.extra["acquisition"]) == ("LittC2SE", "right anterior chest",
                                                                       "simultaneous/multichannel")


def test_cycle_annotation_counted_not_in_context(icbhi):
    r = next(r for r in icbhi.records if r.record_id == "icbhi/104_1b1_Ar_sc_Litt3200")
    assert (r.extra["cycles"], r.extra["wheeze_cycles"], r.extra["crackle_cycles"]) == (14, 10, 0)
    assert "wheeze" not in r.context.lower() and "copd" not in r.context.lower()
    assert sum(r.extra["cycles"] for r in icbhi.records) == 97


def test_context_exact(icbhi):
    r = next(r for r in icbhi.records if r.record_id == "icbhi/102_1b1_Ar_sc_Meditron")
    assert r.context == ("Gender: female. Age: 0.75. Record location: right anterior chest. "
                         "Medical history: not reported. Respiratory symptoms: not reported. "
                         "Smoking status: not reported.")


def test_missing_recordings_reported_with_known_quirk(icbhi):
    assert len(icbhi.problems) == 911  # 921 listed - 10 present
    quirk = [p for p in icbhi.problems if "226_1b1_Pl_sc_Meditron" in p]
    assert len(quirk) == 1 and "never published" in quirk[0]
