"""KAUH adapter on the real 30 bell-mode files and its name parsing/normalisation."""

from __future__ import annotations

from collections import Counter

import pytest
import soundfile as sf

from respiramfm.data.datasets import load_kauh
from respiramfm.data.datasets.kauh import normalise_diagnosis, normalise_location, parse_name


@pytest.fixture(scope="module")
def kauh(shared_data):
    return load_kauh(shared_data / "kauh")


def test_thirty_recordings_thirty_patients(kauh):
    assert len(kauh.records) == 30
    assert len({r.patient_id for r in kauh.records}) == 30
    assert {r.extra["filter"] for r in kauh.records} == {"bell"}
    assert all(r.audio_type == "lung" and r.dataset == "kauh" for r in kauh.records)


def test_normalised_diagnosis_counts(kauh):
    # docs/paper.md §10: the spellings vary, the normalised counts do not
    assert Counter(r.diagnosis for r in kauh.records) == {
        "asthma": 8, "heart failure": 7, "bron": 3, "pleural effusion": 2, "lung fibrosis": 2,
        "heart failure + copd": 2, "copd": 2, "pneumonia": 1, "healthy": 1,
        "heart failure + lung fibrosis": 1, "asthma + lung fibrosis": 1,
    }


def test_file_name_fields(kauh):
    by_id = {r.record_id: r for r in kauh.records}
    r = by_id["kauh/BP21"]  # "BP21_BRON,Crep,P R L ,20,M.wav": trailing space in the location
    assert (r.diagnosis, r.location, r.age, r.sex, r.patient_id) == ("bron", "posterior right lower", 20.0, "male",
                                                                     "kauh/P21")
    assert r.extra["sounds"] == ["crepitations"]
    r = by_id["kauh/BP5"]  # "P L R " -> PRL, as the sheet and RespLLM have it
    assert r.location == "posterior right lower" and r.extra["location_raw"] == "P L R"
    r = by_id["kauh/BP2"]  # "P L L R" -> PLL
    assert r.location == "posterior left lower"
    assert by_id["kauh/BP26"].location == "posterior"
    assert by_id["kauh/BP4"].extra["diagnosis_raw"] == "Heart Failure + Lung Fibrosis "


def test_context_exact(kauh):
    r = next(r for r in kauh.records if r.record_id == "kauh/BP30")
    assert r.diagnosis == "healthy"
    assert r.context == ("Gender: female. Age: 18. Record location: posterior right middle. "
                         "Medical history: not reported. Respiratory symptoms: not reported. "
                         "Smoking status: not reported.")
    assert all("wheez" not in r.context and "crack" not in r.context for r in kauh.records)


def test_sheet_disagreement_reported_file_name_kept(kauh):
    assert len(kauh.problems) == 1
    assert "subject 26" in kauh.problems[0] and "file name kept" in kauh.problems[0]


@pytest.mark.parametrize("raw,canon", [
    ("N", "healthy"), ("asthma", "asthma"), ("Asthma ", "asthma"), ("copd", "copd"),
    ("Heart Failure", "heart failure"), ("heart  failure", "heart failure"), ("Plueral Effusion", "pleural effusion"),
    ("Heart Failure + COPD", "heart failure + copd"), ("Asthma and lung fibrosis", "asthma + lung fibrosis"),
    ("BRON", "bron"), ("flu", None), ("Asthma + gout", None), ("", None),
])
def test_normalise_diagnosis(raw, canon):
    assert normalise_diagnosis(raw) == canon


@pytest.mark.parametrize("raw,phrase", [
    ("P L L", "posterior left lower"), ("PLR", "posterior right lower"), ("P L L R", "posterior left lower"),
    ("A R M", "anterior right middle"), ("a l u", "anterior left upper"), ("P", "posterior"),
    ("X L L", ""), ("P L L R R", ""), ("", ""),
])
def test_normalise_location(raw, phrase):
    assert normalise_location(raw)[1] == phrase


def test_parse_name_variants():
    p = parse_name("DP112_asthma,E W,P L U,45,F")
    assert (p["filter"], p["subject"], p["diagnosis_raw"], p["sex_raw"]) == ("D", 112, "asthma", "F")
    assert isinstance(parse_name("P1_asthma,E W,P L U,45,F"), str)
    assert isinstance(parse_name("BP1_asthma,E W,45,F"), str)


def test_three_filter_modes_group_into_one_patient(tmp_path, shared_data):
    src = next((shared_data / "kauh" / "AudioFiles").glob("BP1_*.wav"))
    audio = tmp_path / "AudioFiles"
    audio.mkdir()
    wave, sr = sf.read(src, dtype="float32")
    for k, f in enumerate("BDE"):  # three distinct recordings (byte-identical files are duplicates)
        sf.write(audio / (f + src.name[1:]), wave * (1.0 - 0.1 * k), sr, subtype="PCM_16")
    (audio / "junk.wav").write_bytes(b"")
    (audio / "BP7_Gout,C,P L L,50,M.wav").write_bytes(b"")
    res = load_kauh(tmp_path)
    assert [r.record_id for r in res.records] == ["kauh/BP1", "kauh/DP1", "kauh/EP1"]
    assert {r.patient_id for r in res.records} == {"kauh/P1"}
    assert [r.extra["filter"] for r in res.records] == ["bell", "diaphragm", "extended"]
    causes = "\n".join(res.problems)
    assert "junk.wav" in causes and "unknown diagnosis 'Gout'" in causes and "Data annotation.xlsx absent" in causes
