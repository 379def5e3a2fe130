"""`respiramfm prepare` end to end: manifests, reports, splits, errors, simulated dispatch."""

from __future__ import annotations

import sys
import types
from collections import Counter

import pytest

import respiramfm.data
from respiramfm.cli import main
from respiramfm.data.records import read_manifest, resolve_audio_path


def test_prepare_icbhi(shared_data, tmp_path, capsys):
    out = tmp_path / "m" / "icbhi.csv"
    assert main(["prepare", "icbhi", "--root", str(shared_data / "icbhi"), "--out", str(out)]) == 0
    recs = read_manifest(out)
    assert len(recs) == 10
    assert all(not r.audio_path.startswith("/") for r in recs)
    assert all(resolve_audio_path(r, out.parent).is_file() for r in recs)
    assert {r.patient_id: r.split for r in recs}["icbhi/103"] == "train"
    assert recs[0].context.startswith("Gender: ")
    report = (tmp_path / "m" / "icbhi.csv.report.txt").read_text()
    assert "records: 10 (with audio 10, metadata-only 0)" in report and "problems: 911" in report
    assert "226_1b1_Pl_sc_Meditron.wav\tlisted in the official split but never published" in report
    assert "10 records (10 with audio)" in capsys.readouterr().out


def test_prepare_kauh_custom_report_and_seed(shared_data, tmp_path):
    out, rep = tmp_path / "kauh.csv", tmp_path / "r.txt"
    args = ["prepare", "kauh", "--root", str(shared_data / "kauh"), "--out", str(out), "--report", str(rep)]
    assert main(args + ["--seed", "5"]) == 0
    first = [r.split for r in read_manifest(out)]
    assert main(args + ["--seed", "5"]) == 0
    assert [r.split for r in read_manifest(out)] == first
    assert set(first) <= {"train", "val", "test"} and "problems: 1" in rep.read_text()
    assert main(args + ["--splits", "keep"]) == 0
    assert {r.split for r in read_manifest(out)} == {""}


def test_prepare_coswara_metadata_only(shared_data, tmp_path):
    out = tmp_path / "coswara.csv"
    assert main(["prepare", "coswara", "--root", str(shared_data / "coswara"), "--out", str(out)]) == 0
    recs = read_manifest(out)
    assert len(recs) == 2746 and all(r.audio_path == "" for r in recs)
    assert Counter(r.split for r in recs).keys() == {"train", "val", "test"}


def test_prepare_generic(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.wav").write_bytes(b"RIFF")
    (tmp_path / "data" / "meta.csv").write_text("file,who,label\nx.wav,A,TB\ny.wav,B,healthy\n")
    out = tmp_path / "out.csv"
    rc = main(["prepare", "generic", "--root", str(tmp_path / "data"), "--csv", "meta.csv", "--dataset", "tbscreen",
               "--columns", "record_id=file,patient_id=who,audio_path=file,diagnosis=label",
               "--diagnosis-map", "healthy=non-tb", "--audio-type", "cough", "--out", str(out)])
    assert rc == 0
    recs = {r.record_id: r for r in read_manifest(out)}
    assert recs["tbscreen/x.wav"].diagnosis == "tb" and recs["tbscreen/y.wav"].diagnosis == "non-tb"
    assert recs["tbscreen/x.wav"].audio_path == "data/x.wav" and recs["tbscreen/y.wav"].audio_path == ""


def test_prepare_errors_are_clean(tmp_path, capsys):
    rc = main(["prepare", "icbhi", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.csv")])
    assert rc == 1 and "dataset root not found" in capsys.readouterr().err
    (tmp_path / "AudioFiles").mkdir()
    rc = main(["prepare", "kauh", "--root", str(tmp_path), "--out", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err
    assert rc == 1 and "no records could be built" in err
    assert (tmp_path / "o.csv.report.txt").is_file() and not (tmp_path / "o.csv").exists()
    with pytest.raises(SystemExit):
        main(["prepare", "icbhi", "--out", str(tmp_path / "o.csv")])  # --root is required


def test_prepare_simulated_dispatch(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("respiramfm.data.simulate")
    fake.add_arguments = lambda p: p.add_argument("--n-patients", type=int, default=3)
    fake.run = lambda args: calls.append((args.source, args.n_patients)) or 0
    monkeypatch.setitem(sys.modules, "respiramfm.data.simulate", fake)
    monkeypatch.setattr(respiramfm.data, "simulate", fake, raising=False)
    assert main(["prepare", "simulated", "--n-patients", "7"]) == 0
    assert calls == [("simulated", 7)]


def test_prepare_simulated_unavailable(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "respiramfm.data.simulate", None)
    monkeypatch.delattr(respiramfm.data, "simulate", raising=False)
    assert main(["prepare", "simulated"]) == 1
    assert "simulated cohort is unavailable" in capsys.readouterr().err
