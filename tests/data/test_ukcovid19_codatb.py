"""UK COVID-19 and CODA TB adapters on small files with the documented columns."""

from __future__ import annotations

import csv
from collections import Counter

import pytest

from respiramfm.data.datasets import load_codatb, load_ukcovid19
from respiramfm.errors import DataError

SYMPTOM_COLS = ["symptom_cough_any", "symptom_new_continuous_cough", "symptom_runny_or_blocked_nose",
                "symptom_shortness_of_breath", "symptom_sore_throat", "symptom_abdominal_pain", "symptom_diarrhoea",
                "symptom_fatigue", "symptom_fever_high_temperature", "symptom_headache",
                "symptom_change_to_sense_of_smell_or_taste", "symptom_loss_of_taste"]


def _write(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _flags(*on):
    return [1 if c in on else 0 for c in SYMPTOM_COLS]


@pytest.fixture
def uk_root(tmp_path):
    header = (["participant_identifier", "age", "gender", "smoker_status", "covid_test_result",
               "respiratory_condition_asthma", "respiratory_condition_other"] + SYMPTOM_COLS
              + ["symptom_none", "symptom_prefer_not_to_say", "symptom_onset"])
    _write(tmp_path / "participant_metadata.csv", header, [
        ["P1", "45-54", "Male", "Never smoked", "Positive", 0, 0,
         *_flags("symptom_cough_any", "symptom_fever_high_temperature"), 0, 0, "1 day"],
        ["P2", "30", "Female", "Current smoker", "Negative", 1, 0, *_flags(), 1, 0, ""],
        ["P3", "", "Prefer not to say", "Ex-smoker", "Negative", "", "", *[""] * 12, 0, 1, ""],
        ["P4", "61", "Female", "", "Inconclusive", 0, 0, *_flags(), 1, 0, ""],
    ])
    _write(tmp_path / "audio_metadata.csv",
           ["participant_identifier", "cough_file_name", "three_cough_file_name", "exhalation_file_name",
            "sentence_file_name"],
           [["P1", "p1_cough.wav", "p1_3cough.wav", "p1_exh.wav", "p1_sent.wav"],
            ["P2", "p2_cough.wav", "p2_3cough.wav", "p2_exh.wav", ""],
            ["P3", "", "", "", ""],
            ["P9", "p9_cough.wav", "", "", ""]])
    _write(tmp_path / "train_test_splits.csv", ["participant_identifier", "splits", "in_matched_rebalanced_train"],
           [["P1", "train", "True"], ["P2", "long", "False"], ["P3", "val", "False"], ["P4", "test", ""]])
    (tmp_path / "audio").mkdir()
    for name in ("p1_cough.wav", "p1_exh.wav", "p2_exh.wav"):
        (tmp_path / "audio" / name).write_bytes(b"RIFF")
    return tmp_path


def test_ukcovid19_records(uk_root):
    res = load_ukcovid19(uk_root)
    by_id = {r.record_id: r for r in res.records}
    assert sorted(by_id) == ["ukcovid19/P1/cough", "ukcovid19/P2/cough", "ukcovid19/P3/cough"]
    p1, p2, p3 = by_id["ukcovid19/P1/cough"], by_id["ukcovid19/P2/cough"], by_id["ukcovid19/P3/cough"]
    assert (p1.diagnosis, p1.split, p1.audio_type, p1.smoker, p1.age) == ("covid", "train", "cough", "no", None)
    assert p1.audio_path.endswith("p1_cough.wav") and p2.audio_path == "" and p3.audio_path == ""
    assert p1.symptoms == "cough; fever or a high temperature" and p1.medical_history == "none"
    assert p1.context == ("Gender: male. Age: 45-54. Patient presents with no medical history conditions. "
                          "Patient presents with the following respiratory symptoms: cough, fever or a high "
                          "temperature. Smoking status: non-smoker.")
    assert (p2.diagnosis, p2.split, p2.extra["official_split"], p2.symptoms, p2.medical_history, p2.smoker) == (
        "non-covid", "test", "long", "none", "asthma", "yes")
    assert p3.context == ("Gender: not reported. Age: not reported. Medical history: not reported. "
                          "Respiratory symptoms: not reported. Smoking status: ex-smoker.")
    causes = "\n".join(res.problems)
    assert "unknown covid_test_result 'Inconclusive'" in causes
    assert "P9 has audio but no metadata row" in causes
    assert causes.count("audio missing") == 2


def test_ukcovid19_several_modalities(uk_root):
    res = load_ukcovid19(uk_root, modality="exhalation,sentence")
    got = {r.record_id: (r.audio_type, bool(r.audio_path)) for r in res.records}
    assert got == {"ukcovid19/P1/exhalation": ("exhalation", True), "ukcovid19/P1/sentence": ("speech", False),
                   "ukcovid19/P2/exhalation": ("exhalation", True), "ukcovid19/P2/sentence": ("speech", False),
                   "ukcovid19/P3/exhalation": ("exhalation", False), "ukcovid19/P3/sentence": ("speech", False)}
    with pytest.raises(DataError, match="unknown UK COVID-19 modality"):
        load_ukcovid19(uk_root, modality="voice")


def test_ukcovid19_missing_column(uk_root):
    _write(uk_root / "train_test_splits.csv", ["participant_identifier", "split"], [["P1", "train"]])
    with pytest.raises(DataError, match=r"train_test_splits.csv: .*lacks required column\(s\) \['splits'\]"):
        load_ukcovid19(uk_root)


@pytest.fixture
def coda_root(tmp_path):
    clinical = tmp_path / "meta_data" / "Clinical"
    cough = tmp_path / "meta_data" / "Cough Metadata"
    audio = tmp_path / "raw_data" / "solicited_data" / "batch1"
    for d in (clinical, cough, audio):
        d.mkdir(parents=True)
    _write(clinical / "CODA_TB_Clinical_Meta_Info.csv",
           ["participant", "sex", "age", "height", "weight", "reported_cough_dur", "tb_prior", "tb_prior_Pul",
            "tb_prior_Extrapul", "tb_prior_Unknown", "hemoptysis", "heart_rate", "temperature", "weight_loss",
            "smoke_lweek", "fever", "night_sweats", "tb_status"],
           [["CODA_1", "Male", "34", "170", "60", "14", "No", "No", "No", "No", "Yes", "90", "37.8", "Yes", "No",
             "No", "Yes", "1"],
            ["CODA_2", "Female", "51", "", "55", "0", "Not sure", "No", "No", "No", "No", "80", "36.6", "No", "Yes",
             "No", "No", "0"],
            ["CODA_3", "Female", "29", "160", "50", "7", "Yes", "Yes", "No", "No", "No", "70", "36.5", "No", "No",
             "No", "No", "0"],
            ["CODA_4", "Male", "40", "", "", "3", "No", "No", "No", "No", "No", "", "", "No", "No", "No", "No",
             "maybe"]])
    _write(cough / "CODA_TB_Solicited_Meta_Info.csv", ["participant", "filename", "sound_prediction_score"],
           [["CODA_1", "1_a.wav", "0.9"], ["CODA_1", "1_b.wav", "0.8"], ["CODA_2", "2_a.wav", "0.7"],
            ["CODA_7", "7_a.wav", "0.7"]])
    for name in ("1_a.wav", "1_b.wav"):
        (audio / name).write_bytes(b"RIFF")
    return tmp_path


def test_codatb_records(coda_root):
    res = load_codatb(coda_root)
    by_id = {r.record_id: r for r in res.records}
    assert sorted(by_id) == ["codatb/1_a", "codatb/1_b", "codatb/2_a", "codatb/CODA_3"]
    assert Counter(r.patient_id for r in res.records) == {"codatb/CODA_1": 2, "codatb/CODA_2": 1,
                                                          "codatb/CODA_3": 1}
    a = by_id["codatb/1_a"]
    assert (a.diagnosis, a.audio_type, a.smoker, a.medical_history) == ("tb", "cough", "no", "none")
    assert a.audio_path.endswith("batch1/1_a.wav") and a.extra["sound_prediction_score"] == 0.9
    assert a.context == ("Gender: male. Age: 34. Patient presents with no medical history conditions. "
                         "Patient presents with the following respiratory symptoms: cough for 14 days, coughing up "
                         "blood, weight loss, night sweats. Smoking status: non-smoker.")
    b = by_id["codatb/2_a"]
    assert (b.diagnosis, b.audio_path, b.symptoms, b.medical_history, b.smoker) == ("non-tb", "", "none", "", "yes")
    assert by_id["codatb/CODA_3"].medical_history == "previous tuberculosis"
    causes = "\n".join(res.problems)
    assert "unknown tb_status 'maybe'" in causes and "CODA_7" in causes and "2_a.wav\taudio missing" in causes
    assert "CODA_3 has no solicited cough" in causes


def test_codatb_missing_metadata(tmp_path):
    with pytest.raises(DataError, match="CODA TB clinical metadata not found"):
        load_codatb(tmp_path)
