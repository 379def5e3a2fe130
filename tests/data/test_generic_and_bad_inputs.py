"""The generic CSV adapter and typed errors / reported skips for malformed input."""

from __future__ import annotations

import pytest

from respiramfm.data.datasets import load_coughvid, load_generic, load_icbhi
from respiramfm.data.datasets.common import read_csv
from respiramfm.data.records import Record, write_manifest
from respiramfm.data.tasks import get_task
from respiramfm.errors import ConfigError, DataError

CSV = """file,subject,result,age,sex,cough,history,smokes,split,site
a1.wav,S1,1,34,M,"cough, fever",none,yes,train,Lusaka
a2.wav,S1,1,34,M,cough,,no,train,Lusaka
b1.wav,S2,0,40-49,female,no,asthma|diabetes,ex-smoker,test,
c1.wav,S3,0,abc,other,,,,test,Cape Town
d1.wav,S4,2,50,F,,,,test,
e1.wav,S5,0,50,F,,,,holdout,
"""


@pytest.fixture
def generic_root(tmp_path):
    (tmp_path / "meta.csv").write_text(CSV, encoding="utf-8")
    for name in ("a1.wav", "a2.wav", "b1.wav"):
        (tmp_path / name).write_bytes(b"RIFF")
    return tmp_path


def _load(root, **kw):
    opts = dict(csv="meta.csv", dataset="tbscreen", audio_type="cough",
                columns="record_id=file,patient_id=subject,audio_path=file,diagnosis=result,symptoms=cough,"
                        "medical_history=history,smoker=smokes", diagnosis_map="1=tb,0=non-tb", labels="tb,non-tb")
    opts.update(kw)
    return load_generic(root, **opts)


def test_generic_maps_columns(generic_root):
    res = _load(generic_root)
    by_id = {r.record_id: r for r in res.records}
    assert sorted(by_id) == ["tbscreen/a1.wav", "tbscreen/a2.wav", "tbscreen/b1.wav", "tbscreen/c1.wav"]
    a1, b1, c1 = by_id["tbscreen/a1.wav"], by_id["tbscreen/b1.wav"], by_id["tbscreen/c1.wav"]
    assert (a1.patient_id, a1.diagnosis, a1.symptoms, a1.medical_history, a1.smoker, a1.split, a1.audio_type) == (
        "tbscreen/S1", "tb", "cough; fever", "none", "yes", "train", "cough")
    assert a1.extra == {"site": "Lusaka"} and a1.audio_path.endswith("a1.wav")
    assert (b1.age, b1.extra["age_text"], b1.symptoms, b1.medical_history, b1.extra["smoking_text"]) == (
        None, "40-49", "none", "asthma; diabetes", "ex-smoker")
    assert b1.context == ("Gender: female. Age: 40-49. Patient presents with the following medical history "
                          "conditions: asthma, diabetes. Patient presents with no obvious respiratory symptoms. "
                          "Smoking status: ex-smoker.")
    assert (c1.age, c1.sex, c1.extra["gender_text"], c1.audio_path) == (None, "", "other", "")
    causes = "\n".join(res.problems)
    assert "age 'abc'" in causes and "label '2'" in causes and "unknown split 'holdout'" in causes
    assert "c1.wav\taudio missing" in causes
    # T3 is fed by this CSV
    t3 = get_task("T3")
    assert [(r.record_id, y) for r, y in t3.select(res.records)] == [
        ("tbscreen/a1.wav", 1), ("tbscreen/a2.wav", 1), ("tbscreen/b1.wav", 0), ("tbscreen/c1.wav", 0)]


def test_generic_root_may_be_the_csv(generic_root):
    res = load_generic(generic_root / "meta.csv", columns="record_id=file,diagnosis=result", dataset="mine")
    # age, sex and split are columns named like Record fields: mapped implicitly (the 'holdout' row is skipped)
    assert len(res.records) == 5 and res.records[0].patient_id == "mine/a1.wav"
    assert (res.records[0].age, res.records[0].sex, res.records[0].split, res.records[0].diagnosis) == (
        34.0, "male", "train", "1")
    assert any("no patient_id column" in p for p in res.problems)


def test_generic_missing_column_names_file(generic_root):
    with pytest.raises(DataError, match=r"meta.csv: .*lacks required column\(s\) \['label'\]"):
        _load(generic_root, columns="record_id=file,diagnosis=label")


@pytest.mark.parametrize("columns,match", [("record_id", "not KEY=VALUE"), ("colour=file", "unknown field"),
                                           ("record_id=file,record_id=x", "repeated")])
def test_generic_bad_mapping(generic_root, columns, match):
    with pytest.raises(ConfigError, match=match):
        _load(generic_root, columns=columns)


def test_generic_bad_dataset_name(generic_root):
    with pytest.raises(ConfigError, match="--dataset"):
        _load(generic_root, dataset="my data/set")


def test_generic_duplicate_record_id(generic_root):
    (generic_root / "meta.csv").write_text("file,result\nx.wav,1\ny.wav,0\nx.wav,0\n")
    with pytest.raises(DataError, match=r"meta.csv: record id 'x.wav' appears on lines 2 and 4"):
        _load(generic_root, columns="record_id=file,diagnosis=result", labels="")


def test_write_manifest_duplicate_ids(tmp_path):
    recs = [Record("a", "p", "d"), Record("a", "q", "d")]
    with pytest.raises(DataError, match="duplicate record_id"):
        write_manifest(recs, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_broken_quoting(tmp_path):
    p = tmp_path / "meta.csv"
    p.write_text('file,result\n"a.wav"x,1\nb.wav,0\n')
    with pytest.raises(DataError, match=r"meta.csv: malformed metadata CSV at line 2"):
        load_generic(p, columns="record_id=file", dataset="d")


def test_non_utf8(tmp_path):
    p = tmp_path / "meta.csv"
    p.write_bytes(b"file,result\nb\xe9b\xe9.wav,1\n")
    with pytest.raises(DataError, match=r"meta.csv: metadata CSV is not UTF-8 text \(bad byte 0xe9 .* line 2\)"):
        load_generic(p, columns="record_id=file", dataset="d")


def test_empty_and_absent_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_csv(tmp_path / "empty.csv")
    with pytest.raises(DataError, match="not found"):
        read_csv(tmp_path / "nope.csv")
    (tmp_path / "dup.csv").write_text("a,a\n1,2\n")
    with pytest.raises(DataError, match="duplicate column"):
        read_csv(tmp_path / "dup.csv")


def test_row_field_count_reported_not_fatal(tmp_path):
    (tmp_path / "metadata_compiled.csv").write_text(
        "uuid,status,cough_detected\nu1,healthy,0.9\nu2,COVID-19,0.95,extra\nu3,flu,0.9\nu4,,0.1\nu1,healthy,0.9\n")
    res = load_coughvid(tmp_path)
    assert [r.record_id for r in res.records] == ["coughvid/u1", "coughvid/u4"]
    causes = "\n".join(res.problems)
    assert "line 3: 4 fields, header has 3" in causes
    assert "unknown status 'flu'" in causes and "u1 listed twice" in causes


def test_icbhi_malformed_official_file(tmp_path, shared_data):
    for name in ("ICBHI_Challenge_demographic_information.txt", "ICBHI_challenge_train_test.txt"):
        (tmp_path / name).write_bytes((shared_data / "icbhi" / name).read_bytes())
    (tmp_path / "ICBHI_Challenge_diagnosis.txt").write_text("101\tURTI\n102\tFlu\n")
    with pytest.raises(DataError, match=r"ICBHI_Challenge_diagnosis.txt: line 2: unknown diagnosis 'Flu'"):
        load_icbhi(tmp_path)
    (tmp_path / "ICBHI_Challenge_diagnosis.txt").write_text("101\tURTI\n")
    with pytest.raises(DataError, match="ICBHI audio folder not found"):
        load_icbhi(tmp_path)
