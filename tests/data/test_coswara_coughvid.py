"""Coswara and Coughvid adapters on the real metadata tables (no audio is shared)."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from respiramfm.data.datasets import load_coswara, load_coughvid
from respiramfm.errors import DataError


@pytest.fixture(scope="module")
def coswara(shared_data):
    return load_coswara(shared_data / "coswara")


@pytest.fixture(scope="module")
def coughvid(shared_data):
    return load_coughvid(shared_data / "coughvid")


def test_coswara_all_participants_metadata_only(coswara):
    assert len(coswara.records) == 2746
    assert len({r.patient_id for r in coswara.records}) == 2746
    assert all(r.audio_path == "" for r in coswara.records)
    assert len(coswara.problems) == 1 and "metadata-only" in coswara.problems[0]


def test_coswara_status_counts(coswara):
    assert Counter(r.extra["covid_status"] for r in coswara.records) == {
        "healthy": 1433, "positive_mild": 426, "no_resp_illness_exposed": 248, "positive_moderate": 165,
        "resp_illness_not_identified": 157, "recovered_full": 146, "positive_asymp": 90, "under_validation": 81}
    assert Counter(r.diagnosis for r in coswara.records) == {
        "healthy": 1433, "covid": 426 + 165 + 90, "no_resp_illness_exposed": 248,
        "resp_illness_not_identified": 157, "recovered_full": 146, "under_validation": 81}


def test_coswara_flags_only_true_counts(coswara):
    # column counts of "True" in combined_data.csv: cough 652, fever 406, asthma 134
    assert sum("cough" in r.symptoms.split("; ") for r in coswara.records) == 652
    assert sum("fever" in r.symptoms.split("; ") for r in coswara.records) == 406
    assert sum("asthma" in r.medical_history.split("; ") for r in coswara.records) == 134
    assert Counter(r.smoker for r in coswara.records) == {"": 1660, "no": 850 + 11, "yes": 123 + 102}
    assert Counter(r.sex for r in coswara.records) == {"male": 1900, "female": 844, "": 2}
    assert sum(r.extra.get("gender_text") == "other" for r in coswara.records) == 2


def test_coswara_context_exact(coswara):
    r = next(r for r in coswara.records if r.record_id == "coswara/AxuYWBN0jFVLINCBqIW5aZmGCdu1/cough-shallow")
    assert (r.diagnosis, r.audio_type, r.smoker) == ("healthy", "cough", "yes")
    assert r.context == ("Gender: male. Age: 25. Patient presents with no medical history conditions. "
                         "Patient presents with no obvious respiratory symptoms. Smoking status: smoker.")
    sick = [r for r in coswara.records if r.symptoms not in ("none", "")]
    assert sick and all("Patient presents with the following respiratory symptoms: " in r.context for r in sick)


def test_coswara_audio_found_when_extracted(tmp_path, shared_data):
    shutil.copy(shared_data / "coswara" / "combined_data.csv", tmp_path / "combined_data.csv")
    folder = tmp_path / "Extracted_data" / "20200420" / "AxuYWBN0jFVLINCBqIW5aZmGCdu1"
    folder.mkdir(parents=True)
    (folder / "cough-shallow.wav").write_bytes(b"RIFF")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "cough-shallow_labels_x.csv").write_text(
        "FILENAME, QUALITY\nAxuYWBN0jFVLINCBqIW5aZmGCdu1_cough-shallow,0\n")
    res = load_coswara(tmp_path)
    with_audio = [r for r in res.records if r.audio_path]
    assert [r.patient_id for r in with_audio] == ["coswara/AxuYWBN0jFVLINCBqIW5aZmGCdu1"]
    assert with_audio[0].extra["quality"] == "bad"
    assert len(res.records) == 2746 and len(res.problems) == 2745  # the others: audio missing, reported
    with pytest.raises(DataError, match="unknown Coswara modality"):
        load_coswara(tmp_path, modality="cough")


def test_coughvid_rows_and_status(coughvid):
    assert len(coughvid.records) == 20072
    assert Counter(r.extra["status"] for r in coughvid.records) == {
        "healthy": 8562, "": 8758, "COVID-19": 1010, "symptomatic": 1742}
    assert Counter(r.diagnosis for r in coughvid.records) == {
        "healthy": 8562, "": 8758, "covid": 1010, "symptomatic": 1742}


def test_coughvid_blank_booleans_not_truthy(coughvid):
    # respiratory_condition: True 2144, False 9170, blank 8758; fever_muscle_pain True 1496
    assert Counter(r.medical_history for r in coughvid.records) == {
        "pre-existing respiratory condition": 2144, "none": 9170, "": 8758}
    assert Counter(r.symptoms for r in coughvid.records) == {"fever or muscle pain": 1496, "": 20072 - 1496}
    blank = next(r for r in coughvid.records if r.extra["status"] == "")
    assert blank.context == ("Gender: not reported. Age: not reported. Medical history: not reported. "
                             "Respiratory symptoms: not reported. Smoking status: not reported.")


def test_coughvid_fields_kept(coughvid):
    r = next(r for r in coughvid.records if r.record_id == "coughvid/00039425-7f3a-42aa-ac13-834aaa2b6b92")
    assert r.extra["cough_detected"] == pytest.approx(0.9609)
    assert r.context == ("Gender: male. Age: 15. Patient presents with no medical history conditions. "
                         "Respiratory symptoms: no fever or muscle pain. Smoking status: not reported.")
    assert sum(1 for r in coughvid.records if "expert_1" in r.extra) == 820
    assert all("cough_detected" in r.extra for r in coughvid.records)


def test_coughvid_audio_matched(tmp_path, shared_data):
    lines = (shared_data / "coughvid" / "metadata_compiled.csv").read_text().splitlines()[:4]
    (tmp_path / "metadata_compiled.csv").write_text("\n".join(lines) + "\n")
    uuid = lines[1].split(",")[0]
    (tmp_path / f"{uuid}.webm").write_bytes(b"\x1a\x45\xdf\xa3")
    res = load_coughvid(tmp_path)
    assert len(res.records) == 3
    assert res.records[0].audio_path.endswith(f"{uuid}.webm")
    assert [r.audio_path for r in res.records[1:]] == ["", ""]
    assert len(res.problems) == 2 and all("audio missing" in p for p in res.problems)
