"""The simulated cohort: files, manifest, splits, tasks, determinism, resume and CLI."""

from __future__ import annotations

import argparse
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from respiramfm.data.records import read_manifest
from respiramfm.data.simulate import (
    STATE_FILE, SimConfig, add_arguments, run, simulate_cohort, simulated_tasks,
)
from respiramfm.data.simulate_audio import encode_audio
from respiramfm.data.simulate_population import DATASETS
from respiramfm.data.tasks import load_tasks_yaml
from respiramfm.data.templates import render_context
from respiramfm.errors import ConfigError, DataError

# Small and short: the size is irrelevant to what these tests check.
SMALL = dict(n_patients=6, datasets=("sim_covid_phone", "sim_lung_unseen"), clip_seconds=(1.0, 1.5))


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    """The --quick cohort, built once through the CLI entry point."""
    out = tmp_path_factory.mktemp("sim") / "quick"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--out", str(out), "--quick", "--seed", "0"])) == 0
    return out


@pytest.fixture(scope="module")
def records(quick):
    return read_manifest(quick / "manifest.csv")


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def test_quick_size_and_layout(quick, records):
    assert 250 <= len(records) <= 400
    for name in ("manifest.csv", "tasks.yaml", "SIMULATED.txt"):
        assert (quick / name).is_file()
    note = (quick / "SIMULATED.txt").read_text()
    assert "SIMULATED DATA - NOT REAL PATIENTS" in note and "no evidence" in note
    assert {r.dataset for r in records} == set(DATASETS)
    assert all(r.dataset.startswith("sim_") for r in records)
    assert all(r.extra["simulated"] is True for r in records)


def test_audio_files_decode_with_declared_rate_and_length(quick, records):
    formats, rates = set(), set()
    for r in records:
        path = quick / r.audio_path
        assert not Path(r.audio_path).is_absolute() and path.is_file()
        x, sr = sf.read(path, dtype="float32")
        assert x.ndim == 1 and sr == r.extra["sample_rate"]
        assert abs(x.size / sr - r.extra["duration_s"]) < 0.03, r.record_id
        assert np.isfinite(x).all() and 0.05 < np.abs(x).max() <= 1.0
        formats.add(r.extra["format"])
        rates.add(sr)
        assert path.suffix == (".wav" if r.extra["format"].startswith("wav") else "." + r.extra["format"])
    assert {"wav", "flac", "ogg"} <= formats
    assert {4000, 16000, 22050, 44100, 48000} <= rates
    share_wav = sum(r.extra["format"].startswith("wav") for r in records) / len(records)
    assert share_wav > 0.7


def test_records_follow_field_conventions(quick, records):
    assert read_manifest(quick / "manifest.csv") == records        # reads back identically
    seen_blank = defaultdict(int)
    for r in records:
        assert r.audio_type in ("cough", "lung")
        assert r.sex in ("male", "female", "") and r.smoker in ("yes", "no", "")
        assert r.age is None or 0 < r.age < 100
        assert r.device and r.context == render_context(r)
        for field in ("symptoms", "medical_history"):
            value = getattr(r, field)
            seen_blank[(field, value if value in ("", "none") else "items")] += 1
            if value not in ("", "none"):
                items = value.split("; ")
                assert "none" not in items and all(i and i == i.strip() for i in items)
        assert bool(r.location) == (r.audio_type == "lung")
    # explicit "none", "not reported" and real phrases all occur
    for field in ("symptoms", "medical_history"):
        assert seen_blank[(field, "")] and seen_blank[(field, "none")] and seen_blank[(field, "items")]


def test_splits_are_patient_level(records):
    by_patient = defaultdict(set)
    for r in records:
        by_patient[r.patient_id].add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())
    assert max(sum(r.patient_id == p for r in records) for p in by_patient) > 1   # repeated recordings exist
    for name, ds in DATASETS.items():
        splits = {r.split for r in records if r.dataset == name}
        assert splits == ({"test"} if ds.role == "zero-shot" else {"train", "val", "test"}), name


def test_tasks_yaml_defines_usable_simulated_tasks(quick, records):
    tasks = load_tasks_yaml(quick / "tasks.yaml", overwrite=True)
    assert [t.name for t in tasks] == [f"SIM-T{i}" for i in range(1, 10)]
    raw = yaml.safe_load((quick / "tasks.yaml").read_text())
    assert all(row["simulated"] is True for row in raw["tasks"])
    for t in tasks:
        assert t.simulated and t.dataset in DATASETS and t.description
        assert t.role == DATASETS[t.dataset].role
        test = [y for r, y in t.select(records) if r.split == "test"]
        assert 0 in test and 1 in test, t.name
    roles = {t.name: (t.role, t.unseen_disease) for t in tasks}
    assert roles["SIM-T4"] == ("supervised", False) and roles["SIM-T7"] == ("zero-shot", False)
    assert roles["SIM-T8"] == roles["SIM-T9"] == ("zero-shot", True)
    # unseen diseases never appear in a dataset used for training
    trained = {t.dataset for t in tasks if t.role == "supervised"}
    assert not {r.diagnosis for r in records if r.dataset in trained} & {"asthma", "pneumonia"}
    # a dataset subset only gets its own tasks
    assert [t.name for t in simulated_tasks(["sim_lung_unseen"])] == ["SIM-T7", "SIM-T8", "SIM-T9"]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = simulate_cohort(tmp_path / "a", SimConfig(seed=5, **SMALL))
    b = simulate_cohort(tmp_path / "b", SimConfig(seed=5, **SMALL))
    c = simulate_cohort(tmp_path / "c", SimConfig(seed=6, **SMALL))
    da, db, dc = _digest(a.parent), _digest(b.parent), _digest(c.parent)
    assert da == db
    assert da["manifest.csv"] != dc["manifest.csv"]
    common = [k for k in da if k.startswith("audio/") and k in dc]
    assert common and all(da[k] != dc[k] for k in common)


def test_rerun_is_a_noop_and_resume_rebuilds_identically(tmp_path):
    cfg = SimConfig(seed=1, **SMALL)
    manifest = simulate_cohort(tmp_path, cfg)
    before = _digest(tmp_path)
    stamp = manifest.stat().st_mtime_ns
    assert simulate_cohort(tmp_path, cfg) == manifest and manifest.stat().st_mtime_ns == stamp
    # Interrupt: the last dataset never finished and the run was not marked complete.
    state = tmp_path / STATE_FILE
    state.write_text(state.read_text().replace('"complete": true', '"complete": false'))
    (tmp_path / ".progress" / "sim_lung_unseen.csv").unlink()
    victim = sorted((tmp_path / "audio" / "sim_lung_unseen").iterdir())[0]
    victim.unlink()
    simulate_cohort(tmp_path, cfg)
    assert _digest(tmp_path) == before


def test_refuses_foreign_or_mismatched_directories(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        simulate_cohort(foreign, SimConfig(**SMALL))
    assert (foreign / "notes.txt").read_text() == "keep me"
    out = tmp_path / "cohort"
    simulate_cohort(out, SimConfig(seed=0, **SMALL))
    with pytest.raises(ConfigError, match="--overwrite"):
        simulate_cohort(out, SimConfig(seed=9, **SMALL))
    simulate_cohort(out, SimConfig(seed=9, overwrite=True, **SMALL))
    assert _digest(out) == _digest(simulate_cohort(tmp_path / "fresh", SimConfig(seed=9, **SMALL)).parent)


@pytest.mark.parametrize("bad", [
    dict(datasets=("sim_nope",)), dict(clip_seconds=(5.0, 2.0)), dict(clip_seconds=(0.1, 2.0)),
    dict(n_patients=0), dict(recordings_per_patient=0),
])
def test_invalid_settings_are_config_errors(tmp_path, bad):
    with pytest.raises(ConfigError):
        simulate_cohort(tmp_path / "x", SimConfig(**bad))
    assert not (tmp_path / "x").exists()


def test_run_accepts_a_plain_namespace(tmp_path, capsys):
    args = argparse.Namespace(out=tmp_path / "ns", seed=2, n_patients=5, datasets="sim_tb_screen",
                              recordings_per_patient=1, quick=False)
    assert run(args) == 0
    recs = read_manifest(tmp_path / "ns" / "manifest.csv")
    assert {r.dataset for r in recs} == {"sim_tb_screen"}
    assert len(recs) == len({r.patient_id for r in recs}) >= 10   # 5 per class minimum
    assert "NOT REAL PATIENTS" in capsys.readouterr().out


def test_prepare_simulated_through_the_cli(tmp_path):
    pytest.importorskip("respiramfm.data.prepare")
    from respiramfm.cli import main

    out = tmp_path / "cli"
    assert main(["prepare", "simulated", "--out", str(out), "--n-patients", "5",
                 "--datasets", "sim_lung_unseen", "--seed", "4"]) == 0
    recs = read_manifest(out / "manifest.csv")
    assert recs and all(r.dataset == "sim_lung_unseen" and r.split == "test" for r in recs)


@pytest.mark.parametrize("fmt,sr", [("wav", 4000), ("wav24", 44100), ("flac", 22050), ("ogg", 16000), ("ogg", 48000)])
def test_encoding_is_bit_exact_and_decodable(fmt, sr):
    x = 0.3 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr) * np.random.default_rng(0).uniform(0.5, 1, sr)
    a, b = encode_audio(x, sr, fmt), encode_audio(x, sr, fmt)
    assert a == b
    import io

    y, got_sr = sf.read(io.BytesIO(a))
    assert got_sr == sr and abs(y.size - sr) <= 1
    assert np.corrcoef(x, y[: x.size])[0, 1] > 0.95


def test_ogg_needs_an_opus_rate():
    with pytest.raises(DataError, match="Opus"):
        encode_audio(np.zeros(4000), 44100, "ogg")
