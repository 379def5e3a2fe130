"""``respiramfm merge``: manifests of two real datasets become one, with leakage and id checks."""

from __future__ import annotations

import pytest

from respiramfm.cli import main
from respiramfm.data.merge import merge_manifests
from respiramfm.data.records import read_manifest, resolve_audio_path, write_manifest
from respiramfm.errors import DataError


@pytest.fixture()
def two_manifests(shared_data, tmp_path):
    a, b = tmp_path / "a" / "icbhi.csv", tmp_path / "b" / "kauh.csv"
    assert main(["prepare", "icbhi", "--root", str(shared_data / "icbhi"), "--out", str(a)]) == 0
    assert main(["prepare", "kauh", "--root", str(shared_data / "kauh"), "--out", str(b)]) == 0
    return a, b


def test_merge_real_manifests_with_zero_shot(two_manifests, tmp_path, capsys):
    a, b = two_manifests
    out = tmp_path / "merged" / "all.csv"
    assert main(["merge", str(a), str(b), "--out", str(out), "--zero-shot", "kauh"]) == 0
    recs = read_manifest(out)
    assert len(recs) == len(read_manifest(a)) + len(read_manifest(b))
    assert {r.split for r in recs if r.dataset == "kauh"} == {"test"}
    assert {r.split for r in recs if r.dataset == "icbhi"} == {r.split for r in read_manifest(a)}
    assert all(resolve_audio_path(r, out.parent).is_file() for r in recs)
    assert "kauh: test=30" in capsys.readouterr().out


def test_merge_refusals(two_manifests, tmp_path):
    a, b = two_manifests
    with pytest.raises(DataError, match="is in both"):
        merge_manifests([a, a], tmp_path / "x.csv")
    with pytest.raises(DataError, match="no input holds"):
        merge_manifests([a], tmp_path / "x.csv", zero_shot=("coswara",))
    recs = read_manifest(a)
    moved = [r for r in recs if r.patient_id == "icbhi/104"]
    for r in moved:
        r.record_id += "-again"
        r.split = "test" if r.split != "test" else "train"
    write_manifest(moved, tmp_path / "again.csv")
    with pytest.raises(DataError, match="icbhi/104"):
        merge_manifests([a, tmp_path / "again.csv"], tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()
