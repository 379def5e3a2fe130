"""The public-copy layouts of ICBHI (cycle segments) and KAUH (middle 10 s), built as tiny real trees.

The ICBHI tree is cut from the real shared recordings at their official cycle boundaries, named as the
public segment copy names them; the KAUH tree reuses real shared KAUH recordings under the
``_middle10sec`` names, with a byte-identical "- Copy" file and a same-id file that differs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from respiramfm.cli import main
from respiramfm.data.datasets import get_adapter, load_icbhi_segments, load_kauh
from respiramfm.data.datasets.icbhi_segments import is_segment_layout, parse_segment_name
from respiramfm.data.datasets.kauh import parse_name
from respiramfm.data.records import read_manifest, resolve_audio_path
from respiramfm.errors import DataError

RECORDINGS = ["101_1b1_Al_sc_Meditron", "102_1b1_Ar_sc_Meditron", "104_1b1_Al_sc_Litt3200"]


def build_icbhi_segments(shared_data: Path, root: Path, cycles: int = 3) -> list[str]:
    """Cut the first cycles of three real recordings into the segment layout; returns the record ids."""
    src = shared_data / "icbhi" / "audio_and_txt_files"
    ann = root / "audio_and_txt_files"
    ann.mkdir(parents=True)
    for d in ("Crack", "Normal", "Wheeze"):
        (root / d).mkdir()
    ids, counters = [], {"crack": 0, "wheeze": 0, "normal": 0}
    for rec in RECORDINGS:
        shutil.copy(src / f"{rec}.txt", ann / f"{rec}.txt")
        wave, sr = sf.read(src / f"{rec}.wav", dtype="float32")
        lines = [ln.split() for ln in (src / f"{rec}.txt").read_text().splitlines() if ln.strip()]
        for i, (start, end, crackle, wheeze) in enumerate(lines[:cycles], start=1):
            cls = "crack" if crackle == "1" else "wheeze" if wheeze == "1" else "normal"
            folder = {"crack": "Crack", "wheeze": "Wheeze", "normal": "Normal"}[cls]
            counters[cls] += 1
            sep = "_" if cls == "normal" else ""
            name = f"{cls}{sep}{counters[cls]}__{rec}_s{i}_.wav"
            seg = wave[int(float(start) * sr): int(float(end) * sr)]
            sf.write(root / folder / name, seg, sr, subtype="PCM_16")
            ids.append(f"icbhi/{rec}_s{i}")
    (root / "patient_diagnosis.csv").write_text("ID,CLASS\n101,URTI\n102,Healthy\n103,Asthma\n104,COPD\n")
    (root / "demographic_info.txt").write_text(
        "101 3 F NA 19 99\n102 0.75 F NA 9.8 73\n103 70 F 33 NA NA\n104 70 F 28.47 NA NA\n")
    return ids


def build_kauh_middle10(shared_data: Path, root: Path) -> Path:
    audio = root / "Audio Files Test"
    audio.mkdir(parents=True)
    srcs = sorted((shared_data / "kauh" / "AudioFiles").glob("BP*.wav"))[:3]
    for src in srcs:
        wave, sr = sf.read(src, dtype="float32")
        mid = wave[: 10 * sr]
        stem = src.stem
        for k, f in enumerate("BDE"):
            sf.write(audio / f"{f}{stem[1:]}_middle10sec.wav", mid * (1.0 - 0.1 * k), sr, subtype="PCM_16")
    first = sorted(audio.glob("BP*_middle10sec.wav"))[0]
    copy = audio / first.name.replace("_middle10sec", " - Copy_middle10sec")
    shutil.copy(first, copy)
    # same filter and subject as `first`, different bytes: reported, not silently merged
    clash = audio / first.name.replace("_middle10sec", "_middle10sec_v2")
    wave, sr = sf.read(first, dtype="float32")
    sf.write(clash, wave * 0.5, sr, subtype="PCM_16")
    return first


def test_segment_name_parsing():
    p = parse_segment_name("crack100__157_1b1_Lr_sc_Meditron_s2_")
    assert (p["class"], p["n"], p["recording"], p["cycle"], p["pid"], p["device"], p["location_code"]) == (
        "crack", 100, "157_1b1_Lr_sc_Meditron", 2, "157", "Meditron", "Lr")
    assert parse_segment_name("normal_1000__143_1b1_Al_sc_Meditron_s1_")["class"] == "normal"
    assert isinstance(parse_segment_name("crack100__157_Lr_s2_"), str)
    assert isinstance(parse_segment_name("157_1b1_Lr_sc_Meditron"), str)


def test_icbhi_segment_layout(shared_data, tmp_path):
    ids = build_icbhi_segments(shared_data, tmp_path)
    assert is_segment_layout(tmp_path)
    (tmp_path / "Crack" / "crack999__999_1b1_Al_sc_Meditron_s1_.wav").write_bytes(b"RIFF")
    (tmp_path / "Normal" / "notes.wav").write_bytes(b"")
    res = load_icbhi_segments(tmp_path)
    assert sorted(r.record_id for r in res.records) == sorted(ids)
    by_id = {r.record_id: r for r in res.records}
    r = by_id["icbhi/104_1b1_Al_sc_Litt3200_s1"]
    assert (r.patient_id, r.diagnosis, r.device, r.location, r.age, r.sex) == (
        "icbhi/104", "copd", "Litt3200", "left anterior chest", 70.0, "female")
    assert r.extra["layout"] == "cycle-segments" and r.extra["cycle"] == 1
    assert r.extra["cycle_end_s"] > r.extra["cycle_start_s"]
    # the segment's sound class is kept out of the text the LLM reads
    assert all(r.extra["segment_class"] in ("crackle", "wheeze", "normal") for r in res.records)
    assert all(w not in r.context.lower() for r in res.records for w in ("crackle", "wheeze"))
    assert {r.patient_id for r in res.records if r.record_id.startswith("icbhi/101")} == {"icbhi/101"}
    dur = sf.info(r.audio_path).duration
    assert dur == pytest.approx(r.extra["cycle_end_s"] - r.extra["cycle_start_s"], abs=1e-3)
    problems = "\n".join(res.problems)
    assert "patient 999 is not in patient_diagnosis.csv" in problems
    assert "notes.wav" in problems and "does not follow" in problems


def test_icbhi_auto_detects_both_layouts(shared_data, tmp_path):
    build_icbhi_segments(shared_data, tmp_path / "seg")
    adapter = get_adapter("icbhi")
    assert all(r.extra.get("layout") == "cycle-segments" for r in adapter(tmp_path / "seg").records)
    official = adapter(shared_data / "icbhi").records
    assert len(official) == 10 and not any("layout" in r.extra for r in official)


def test_icbhi_segment_bad_diagnosis_file_names_file(shared_data, tmp_path):
    build_icbhi_segments(shared_data, tmp_path)
    (tmp_path / "patient_diagnosis.csv").write_text("ID,CLASS\n101,Gout\n")
    with pytest.raises(DataError, match="unknown diagnosis 'Gout'") as exc:
        load_icbhi_segments(tmp_path)
    assert "patient_diagnosis.csv" in str(exc.value)


def test_prepare_icbhi_segments_cli(shared_data, tmp_path, capsys):
    build_icbhi_segments(shared_data, tmp_path / "icbhi")
    out = tmp_path / "m" / "icbhi.csv"
    assert main(["prepare", "icbhi", "--root", str(tmp_path / "icbhi"), "--out", str(out)]) == 0
    recs = read_manifest(out)
    assert len(recs) == 9 and all(resolve_audio_path(r, out.parent).is_file() for r in recs)
    # patient-level splits: all segments of one patient share a split
    for pid in {r.patient_id for r in recs}:
        assert len({r.split for r in recs if r.patient_id == pid}) == 1


def test_kauh_suffix_tolerant_names():
    p = parse_name("BP101_Asthma,E W,P L M,12,F_middle10sec")
    assert (p["sex_raw"], p["suffix"], p["age_raw"]) == ("F", "middle10sec", "12")
    p = parse_name("BP13_Heart Failure,C,P L L,55,M - Copy_middle10sec")
    assert (p["sex_raw"], p["suffix"]) == ("M", "Copy_middle10sec")
    assert parse_name("DP112_asthma,E W,P L U,45,F")["suffix"] == ""


def test_kauh_middle10_layout_skips_copies(shared_data, tmp_path):
    first = build_kauh_middle10(shared_data, tmp_path)
    res = load_kauh(tmp_path)
    assert len(res.records) == 9 and len({r.patient_id for r in res.records}) == 3
    assert {r.extra["filter"] for r in res.records} == {"bell", "diaphragm", "extended"}
    assert all("middle10sec" not in r.context and "copy" not in r.context.lower() for r in res.records)
    assert all(r.sex in ("male", "female") for r in res.records)
    assert all(r.extra["name_suffix"] == "middle10sec" for r in res.records)
    kept = {Path(r.audio_path).name for r in res.records}
    assert first.name in kept and not any("Copy" in k or "_v2" in k for k in kept)
    problems = "\n".join(res.problems)
    assert "- Copy_middle10sec.wav\tbyte-identical to " + first.name in problems
    assert "with different content; skipped" in problems


def test_prepare_kauh_audio_dir_option(shared_data, tmp_path):
    build_kauh_middle10(shared_data, tmp_path / "kauh")
    (tmp_path / "kauh" / "Audio Files Test").rename(tmp_path / "kauh" / "lung")
    out = tmp_path / "kauh.csv"
    assert main(["prepare", "kauh", "--root", str(tmp_path / "kauh"), "--out", str(out)]) == 1
    assert main(["prepare", "kauh", "--root", str(tmp_path / "kauh"), "--audio-dir", "lung", "--out", str(out)]) == 0
    recs = read_manifest(out)
    assert len(recs) == 9
    report = Path(str(out) + ".report.txt").read_text()
    assert "byte-identical" in report


def test_kauh_segments_decode(shared_data, tmp_path):
    build_kauh_middle10(shared_data, tmp_path)
    rec = load_kauh(tmp_path).records[0]
    wave, sr = sf.read(rec.audio_path, dtype="float32")
    assert sr == 4000 and len(wave) <= 10 * sr and np.abs(wave).max() > 0


def test_prepare_generic_help_lists_every_field(capsys):
    from respiramfm.data.datasets.generic import FIELD_HELP, MAPPABLE

    with pytest.raises(SystemExit):
        main(["prepare", "generic", "--help"])
    out = capsys.readouterr().out
    assert set(MAPPABLE) == set(FIELD_HELP)
    for name, meaning in FIELD_HELP.items():
        assert f"  {name:<16} {meaning}" in out


def test_kauh_identical_files_with_conflicting_labels_are_both_dropped(shared_data, tmp_path):
    first = build_kauh_middle10(shared_data, tmp_path)
    before = {r.audio_path for r in load_kauh(tmp_path).records}
    other = first.parent / "BP999_N,N,P L L,30,M_middle10sec.wav"   # the same bytes filed as a healthy subject
    shutil.copy(first, other)
    res = load_kauh(tmp_path)
    after = {r.audio_path for r in res.records}
    assert before - after == {str(first.resolve())} and not any("BP999" in p for p in after)
    assert "which names another subject or diagnosis; both skipped" in "\n".join(res.problems)
