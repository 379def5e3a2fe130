"""End-to-end tests of ``respiramfm pretrain-audio`` with a tiny HTS-AT on real decoded audio files.

Torch runs single-threaded here: on a shared 2-core machine a 1-thread tiny HTS-AT is ~10x
faster than a 2-thread one, and it makes the in-process and subprocess runs comparable bit for bit.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from respiramfm import cli
from respiramfm.config import load_config
from respiramfm.data.records import Record, write_manifest
from respiramfm.encoders.pretrain import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[2]
FAULT = ROOT / "tests" / "testkit" / "fault.py"  # runs the CLI with a callback that SIGKILLs after step N
TINY = ["encoder.embed_dim=8", "encoder.depths=[1,1,1,1]", "encoder.num_heads=[1,1,2,4]", "proj_dim=64",
        "crop_frames=32", "lr=1e-3", "torch_threads=1", "device=cpu", "progress=false"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make_clips(root: Path, n: int, seconds: float = 2.0, sr: int = 16000) -> list[Record]:
    """``n`` clearly different recordings: log-spaced pitches, different modulation rates and timbres."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    recs = []
    for k in range(n):
        f0 = 150 * 1.12**k
        y = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 6.28)) * (0.6 + 0.4 * np.sin(2 * np.pi * (1 + k % 5) * t))
        if k % 2:
            y += 0.5 * np.sin(2 * np.pi * 2.5 * f0 * t)
        y += 0.02 * rng.standard_normal(t.size)
        path = root / f"clip{k:02d}.wav"
        sf.write(path, (0.3 * y / np.abs(y).max()).astype(np.float32), sr)
        recs.append(Record(record_id=f"c{k}", patient_id=f"p{k}", dataset="synth", audio_path=path.name, split="train"))
    return recs


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """32 distinct clips + one corrupt file + one missing file + one test-split clip; 24 steps of batch 8."""
    root = tmp_path_factory.mktemp("pretrain")
    data = root / "data"
    recs = make_clips(data, 33)
    recs[-1].split = "test"  # excluded by default
    (data / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage that is not audio")
    recs.append(Record(record_id="broken", patient_id="pb", dataset="synth", audio_path="broken.wav", split="train"))
    recs.append(Record(record_id="gone", patient_id="pg", dataset="synth", audio_path="missing.wav", split="train"))
    write_manifest(recs, data / "manifest.csv")
    out = root / "run"
    n = torch.get_num_threads()
    cfg = load_config(PretrainConfig, None, TINY + [f"manifests=[{data / 'manifest.csv'}]", f"out_dir={out}",
                                                    "batch_size=8", "max_steps=24", "log_every=1", "save_every=12"])
    final = pretrain(cfg)
    torch.set_num_threads(n)
    return {"out": out, "final": final, "data": data, "cfg": cfg}


def test_loss_decreases_and_accuracy_beats_chance(trained):
    m = metrics(trained["out"])
    assert [r["step"] for r in m] == list(range(1, 25))
    assert all(np.isfinite(r["loss"]) for r in m)
    first = np.mean([r["loss"] for r in m[:4]])
    last = np.mean([r["loss"] for r in m[-6:]])
    assert last < first - 0.3, (first, last)
    chance = m[0]["chance"]
    assert chance == pytest.approx(1 / 8)
    assert np.mean([r["acc"] for r in m[-8:]]) >= 2 * chance
    assert m[-1]["lr"] == pytest.approx(1e-3 * 0.99**5)  # 4 steps per epoch: step 24 is in epoch 5


def test_undecodable_and_missing_files_are_reported_and_skipped(trained):
    out = trained["out"]
    errors = {r["record_id"]: r for r in read_tsv(out / "errors.tsv")}
    assert set(errors) == {"broken", "gone"}
    assert errors["broken"]["audio_path"].endswith("broken.wav") and errors["broken"]["error"]
    assert "missing.wav" in errors["gone"]["audio_path"]
    used = read_tsv(out / "recordings.tsv")
    assert [r["record_id"] for r in used] == [f"c{k}" for k in range(32)]  # c32 is test split
    assert all(int(r["frames"]) == 251 for r in used)  # 2 s clips repeat-padded to 8 s


def test_encoder_loads_strictly_and_embeds(trained, opera_fixtures):
    from respiramfm.audio import FrontendConfig, load, opera_spectrogram_batch
    from respiramfm.models.opera_ct import from_checkpoint

    final = trained["final"]
    assert final == trained["out"] / "encoder.safetensors"
    with safe_open(str(final), "pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())
    assert meta["embed_dim"] == "8" and meta["depths"] == "1,1,1,1" and meta["step"] == "24"
    assert not any(k.startswith(("encoder.", "head.g", "g.", "linear.")) for k in keys)
    enc = from_checkpoint(final)
    assert enc.out_dim == 64
    # the exported weights are the last checkpoint's encoder weights
    ckpt = load_file(str(trained["out"] / "checkpoints" / "step_000000024" / "model.safetensors"))
    saved = load_file(str(final))
    assert set(saved) == {k[len("encoder."):] for k in ckpt if k.startswith("encoder.")}
    assert all(torch.equal(saved[k], ckpt["encoder." + k]) for k in saved)
    # embeddings of real recordings (fixture excerpts) and of two synthetic clips
    waves = [load(opera_fixtures / "short_3s_kauh_BP30.wav"), load(opera_fixtures / "short_1p2s_icbhi_102.wav"),
             load(trained["data"] / "clip00.wav"), load(trained["data"] / "clip20.wav")]
    specs = opera_spectrogram_batch(waves, FrontendConfig())
    emb = torch.stack([enc(torch.from_numpy(s)[None])[0] for s in specs])
    assert emb.shape == (4, 64) and torch.isfinite(emb).all()
    assert torch.cdist(emb, emb)[~torch.eye(4, dtype=bool)].min() > 1e-3  # different inputs, different vectors
    again = enc(torch.from_numpy(specs[0])[None])[0]
    assert torch.equal(again, emb[0])  # eval semantics: deterministic


def test_cli_refuses_to_mix_runs_and_rejects_changed_settings(trained, capsys):
    out, manifest = trained["out"], trained["data"] / "manifest.csv"
    base = ["pretrain-audio", "--manifest", str(manifest), "--out", str(out)]
    sets = [a for s in TINY + ["batch_size=8", "max_steps=24", "log_every=1", "save_every=12"] for a in ("--set", s)]
    assert cli.main(base + sets) == 1
    assert "--resume" in capsys.readouterr().err
    assert cli.main(base + sets + ["--set", "lr=0.5", "--resume"]) == 1
    assert "['lr']" in capsys.readouterr().err
    # resuming a finished run trains nothing and rewrites the same encoder
    before = load_file(str(trained["final"]))
    assert cli.main(base + sets + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming from step 24" in captured.out
    after = load_file(str(trained["final"]))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(metrics(out)) == 24


def test_config_errors_are_typed(tmp_path, capsys):
    assert cli.main(["pretrain-audio", "--out", str(tmp_path / "o")]) == 1
    assert "no manifests" in capsys.readouterr().err
    recs = make_clips(tmp_path / "d", 3)
    write_manifest(recs, tmp_path / "d" / "m.csv")
    args = ["pretrain-audio", "--manifest", str(tmp_path / "d" / "m.csv"), "--out", str(tmp_path / "o")]
    assert cli.main(args + [a for s in TINY + ["batch_size=8"] for a in ("--set", s)]) == 1
    assert "fewer than one step needs" in capsys.readouterr().err
    assert cli.main(args + ["--set", "batch_size=1"]) == 1
    assert "in-batch negatives" in capsys.readouterr().err


def _small_run_args(data: Path, out: Path, cache: Path) -> list[str]:
    sets = TINY + ["batch_size=4", "max_steps=6", "log_every=1", "save_every=2", f"cache_dir={cache}"]
    return ["pretrain-audio", "--manifest", str(data / "m.csv"), "--out", str(out)] + [
        a for s in sets for a in ("--set", s)]


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, capsys):
    """8 clips, batch 4 (2 steps per epoch), 6 steps, checkpoints every 2; the victim is SIGKILLed after step 3."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_manifest(make_clips(data, 8), data / "m.csv")
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    assert cli.main(_small_run_args(data, ref, cache)) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(FAULT), "3", *_small_run_args(data, victim, cache)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (victim / "encoder.safetensors").exists()
    assert json.loads((victim / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert [r["step"] for r in metrics(victim)] == [1, 2, 3]

    capsys.readouterr()
    assert cli.main(_small_run_args(data, victim, cache) + ["--resume"]) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert [r["step"] for r in metrics(victim)] == list(range(1, 7))
    assert [r["loss"] for r in metrics(victim)] == [r["loss"] for r in metrics(ref)]
    for name in ("encoder.safetensors", "checkpoints/step_000000006/model.safetensors",
                 "checkpoints/step_000000006/optimizer.safetensors"):
        a, b = load_file(str(ref / name)), load_file(str(victim / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # the training set may not change under a resumed run
    write_manifest(make_clips(data, 7), data / "m.csv")
    assert cli.main(_small_run_args(data, victim, cache) + ["--set", "max_steps=8", "--resume"]) == 1
    assert "usable recordings differ" in capsys.readouterr().err


def test_pretrains_on_real_recordings(shared_data, tmp_path):
    """Real ICBHI (44.1/4 kHz, 20 s) and KAUH (4 kHz) files through cache, crops and two training steps."""
    icbhi = sorted((shared_data / "icbhi" / "audio_and_txt_files").glob("*.wav"))[:5]
    kauh = sorted((shared_data / "kauh" / "AudioFiles").glob("*.wav"))[:3]
    assert len(icbhi) == 5 and len(kauh) == 3
    recs = [Record(record_id=p.stem, patient_id=p.stem.split("_")[0], dataset="real", audio_path=str(p), split="train")
            for p in icbhi + kauh]
    write_manifest(recs, tmp_path / "m.csv")
    cfg = load_config(PretrainConfig, None, TINY + [f"manifests=[{tmp_path / 'm.csv'}]", f"out_dir={tmp_path / 'o'}",
                                                    "batch_size=4", "max_steps=2", "crop_frames=50"])
    final = pretrain(cfg)
    used = read_tsv(tmp_path / "o" / "recordings.tsv")
    assert len(used) == 8 and read_tsv(tmp_path / "o" / "errors.tsv") == []
    assert all(int(r["frames"]) >= 251 for r in used)  # at least 8 s after padding
    assert any(int(r["frames"]) > 251 for r in used)  # the 20 s ICBHI recordings stay whole
    assert all(np.isfinite(r["loss"]) for r in metrics(tmp_path / "o"))
    from respiramfm.models.opera_ct import from_checkpoint

    assert from_checkpoint(final).out_dim == 64


@pytest.mark.slow
def test_two_processes_with_accelerate(tmp_path):
    """DDP over 2 CPU processes (gloo): both ranks' RNG is checkpointed and the step count halves."""
    data = tmp_path / "data"
    write_manifest(make_clips(data, 8), data / "m.csv")
    out = tmp_path / "ddp"
    sets = TINY + ["batch_size=2", "max_steps=3", "log_every=1", "save_every=2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "respiramfm.cli", "pretrain-audio", "--manifest", str(data / "m.csv"), "--out", str(out)]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("encoder.safetensors") == 1
    state = json.loads((out / "checkpoints" / "step_000000003" / "state.json").read_text())
    assert state["world_size"] == 2 and state["steps_per_epoch"] == 2  # 8 clips / (2 per process x 2)
    assert sorted(p.name for p in (out / "checkpoints" / "step_000000003").glob("rng_rank*")) == [
        "rng_rank0.safetensors", "rng_rank1.safetensors"]
    r0 = load_file(str(out / "checkpoints" / "step_000000003" / "rng_rank0.safetensors"))["torch_cpu"]
    r1 = load_file(str(out / "checkpoints" / "step_000000003" / "rng_rank1.safetensors"))["torch_cpu"]
    assert not torch.equal(r0, r1)  # each process has its own dropout stream
    from respiramfm.models.opera_ct import from_checkpoint

    assert from_checkpoint(out / "encoder.safetensors").out_dim == 64
