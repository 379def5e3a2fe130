import os

import pytest

from respiramfm.data.records import Record, read_manifest, resolve_audio_path, write_manifest
from respiramfm.errors import DataError
from respiramfm.utils.io import atomic_path, atomic_write_text, sha256_file


def _rec(i, **kw):
    base = dict(record_id=f"r{i}", patient_id=f"p{i // 2}", dataset="d", audio_path=f"a/{i}.wav", age=3.5 if i else None,
                symptoms="fever; dry cough" if i % 2 else "none", extra={"k": i, "s": "é"})
    base.update(kw)
    return Record(**base)


def test_manifest_roundtrip(tmp_path):
    recs = [_rec(i) for i in range(5)]
    recs[1].context = 'Quoted "text", with commas;\nand a newline.'
    path = write_manifest(recs, tmp_path / "m.csv")
    back = read_manifest(path)
    assert back == recs
    assert back[0].age is None and back[1].age == 3.5
    assert resolve_audio_path(back[2], tmp_path) == tmp_path / "a/2.wav"
    assert resolve_audio_path(Record("x", "p", "d"), tmp_path) is None


def test_duplicate_ids_rejected(tmp_path):
    with pytest.raises(DataError, match="duplicate record_id"):
        write_manifest([_rec(1), _rec(1)], tmp_path / "m.csv")
    p = tmp_path / "dup.csv"
    p.write_text("record_id,patient_id,dataset\nr1,p1,d\nr1,p2,d\n")
    with pytest.raises(DataError, match="duplicate") as e:
        read_manifest(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"record_id,patient_id\nr1,p1\n", "lacks required column"),
        (b"record_id,patient_id,dataset\nr1,p1,d,extra-field\n", "more fields"),
        (b'record_id,patient_id,dataset\nr1,"p1,d\n', "malformed CSV"),
        (b"record_id,patient_id,dataset\n\xff\xfe,p,d\n", "not UTF-8"),
        (b"record_id,patient_id,dataset,age\nr1,p1,d,old\n", "age"),
        (b"record_id,patient_id,dataset,split\nr1,p1,d,training\n", "unknown split"),
        (b"record_id,patient_id,dataset,extra\nr1,p1,d,{bad json\n", "extra is not valid JSON"),
        (b"record_id,patient_id,dataset\n,p1,d\n", "empty record_id"),
    ],
)
def test_malformed_manifests(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        read_manifest(p)
    assert str(p) in str(e.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_manifest(tmp_path / "nope.csv")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]
    assert len(sha256_file(target)) == 64
