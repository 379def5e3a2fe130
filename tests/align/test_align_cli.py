"""`respiramfm align` on real stores: outputs, untouched test split, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from respiramfm.models.projector import load_projector
from respiramfm.cli import main
from respiramfm.data.records import Record, read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "align.yaml"


def _args(stores, out_dir, *extra, manifest=None, audio=None, text=None):
    sets = [f"manifest={manifest or stores.manifest}", f"audio_store={audio or stores.audio_store}",
            f"text_store={text or stores.text_store}", f"out_dir={out_dir}", f"projector.in_dim={stores.audio_dim}",
            "progress=false", "figure=false", "threads=1", "projector.hidden=64",
            f"task_files=[{stores.manifest.parent / 'tasks.yaml'}]", *extra]
    out = ["align", "--config", str(CONFIG)]
    for s in sets:
        out += ["--set", s]
    return out


def test_cli_infers_both_widths_from_the_stores(sim_stores, tmp_path):
    """No ``projector.in_dim``/``out_dim`` given: the projector takes the audio and text stores' widths."""
    full = _args(sim_stores, tmp_path / "w", "epochs=1")
    at = full.index(f"projector.in_dim={sim_stores.audio_dim}")
    args = full[:at - 1] + full[at + 1:]  # drop that --set and its value
    assert not any(a.startswith("projector.in_dim") for a in args) and len(args) == len(full) - 2
    assert main(args) == 0
    _, cfg = load_projector(tmp_path / "w")
    assert (cfg.in_dim, cfg.out_dim) == (sim_stores.audio_dim, sim_stores.text_dim) and cfg.in_dim != 768


def _same_projector(a: Path, b: Path) -> None:
    ta, tb = load_file(a / "projector.safetensors"), load_file(b / "projector.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert np.array_equal(ta[k].numpy(), tb[k].numpy()), k


def test_cli_trains_and_writes_everything(sim_stores, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(_args(sim_stores, out, "epochs=6", "eval_every=2", "figure=true", "select_metric=val_loss"))
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["out_dir"] == str(out) and line["best_epoch"] in (0, 2, 4, 6)
    for name in ("projector.safetensors", "projector.json", "metrics.jsonl", "summary.json", "config.yaml",
                 "skipped.tsv", "checkpoints/latest.json", "tsne.png"):
        assert (out / name).is_file(), name
    model, cfg = load_projector(out)
    assert (cfg.in_dim, cfg.out_dim, cfg.final) == (sim_stores.audio_dim, sim_stores.text_dim, "layernorm")
    summary = json.loads((out / "summary.json").read_text())
    records = read_manifest(sim_stores.manifest)
    assert summary["n_train"] == sum(r.split == "train" for r in records)
    assert summary["n_val"] == sum(r.split == "val" for r in records)
    assert summary["val_source"] == "manifest" and summary["simulated"] is True
    assert summary["provenance"]["audio_encoder"] == "logmel-stats"
    assert summary["provenance"]["text_space"] == "hidden_mean"
    assert set(summary["figure"]) == {"silhouette_before", "silhouette_after", "n_points", "rows"}
    assert summary["figure"]["n_points"] == summary["n_train"] + summary["n_val"]
    assert (out / "tsne.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a finished run started again is a no-op that reproduces the same outputs
    shutil.copytree(out, tmp_path / "first")
    assert main(_args(sim_stores, out, "epochs=6", "eval_every=2", "select_metric=val_loss")) == 0
    _same_projector(out, tmp_path / "first")
    assert json.loads((out / "summary.json").read_text())["epochs_this_run"] == 0
    # ... but a different configuration in the same out_dir is refused
    assert main(_args(sim_stores, out, "epochs=6", "eval_every=2", "loss=infonce")) == 1
    assert "different configuration" in capsys.readouterr().err


def test_test_split_is_never_read(sim_stores, tmp_path):
    """Scrambling every test row (vectors, contexts, labels; adding test rows) leaves the result bit-identical."""
    args = ("epochs=4", "eval_every=2", "select_metric=r1")
    assert main(_args(sim_stores, tmp_path / "a", *args)) == 0

    records = read_manifest(sim_stores.manifest)
    test_ids = {r.record_id for r in records if r.split == "test"}
    assert test_ids
    audio = tmp_path / "audio_copy"
    shutil.copytree(sim_stores.audio_store, audio)
    index = json.loads((audio / "index.json").read_text())
    arr = np.load(audio / index["embeddings_file"])
    rows = [i for i, rid in enumerate(index["ids"]) if rid in test_ids]
    arr[rows] = np.random.default_rng(0).normal(scale=100.0, size=(len(rows), arr.shape[1]))
    np.save(audio / index["embeddings_file"], arr)
    text = tmp_path / "text_copy"
    shutil.copytree(sim_stores.text_store, text)
    lines = (text / "records.tsv").read_text().splitlines()
    (text / "records.tsv").write_text("\n".join(x for x in lines if x.split("\t")[0] not in test_ids) + "\n")
    changed = [replace(r, context="scrambled " + r.record_id, diagnosis="healthy") if r.split == "test" else r
               for r in records]
    changed.append(Record(record_id="extra-test", patient_id="extra-p", dataset=records[0].dataset,
                          audio_path="audio/none.wav", split="test", context="unseen"))
    manifest_b = tmp_path / "cohort_b" / "manifest.csv"
    write_manifest(changed, manifest_b)
    assert main(_args(sim_stores, tmp_path / "b", *args, manifest=manifest_b, audio=audio, text=text)) == 0

    _same_projector(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    assert "extra-test" not in (tmp_path / "b" / "skipped.tsv").read_text()


@pytest.mark.timeout(600)
def test_resume_after_sigkill_equals_uninterrupted(sim_stores, tmp_path):
    args = ("epochs=300", "eval_every=25", "checkpoint_every=20", "select_metric=val_loss", "loss=dup_aware",
            "batch_size=4")
    victim = tmp_path / "victim"
    cmd = [sys.executable, "-m", "respiramfm.cli", *_args(sim_stores, victim, *args)]
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = victim / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err.decode()[-2000:]}"
    doc = json.loads((victim / "checkpoints" / json.loads(ckpt.read_text())["dir"] / "state.json").read_text())
    assert 0 < doc["epoch"] < 300
    assert main(_args(sim_stores, victim, *args)) == 0          # resumes from the checkpoint
    summary = json.loads((victim / "summary.json").read_text())
    assert summary["epochs_this_run"] == 300 - doc["epoch"]

    clean = tmp_path / "clean"
    assert main(_args(sim_stores, clean, *args)) == 0
    _same_projector(victim, clean)
    assert (victim / "metrics.jsonl").read_text() == (clean / "metrics.jsonl").read_text()
    assert json.loads((clean / "summary.json").read_text())["best"] == summary["best"]


def test_missing_vectors_are_skipped_and_reported(sim_stores, tmp_path, capsys):
    records = read_manifest(sim_stores.manifest)
    train = [r for r in records if r.split == "train"]
    extra = [replace(train[0], record_id="ghost-1", audio_path="audio/ghost.wav"),
             replace(train[0], record_id="no-audio", audio_path="")]
    manifest = tmp_path / "cohort" / "manifest.csv"
    write_manifest(records + extra, manifest)
    assert main(_args(sim_stores, tmp_path / "run", "epochs=2", "eval_every=1", manifest=manifest)) == 0
    skipped = (tmp_path / "run" / "skipped.tsv").read_text()
    assert "ghost-1\ttrain\tno audio embedding in store" in skipped
    assert "no-audio\ttrain\trecord has no audio" in skipped
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"] == {"no audio embedding in store": 1, "record has no audio": 1}
    # unusable inputs: clear errors naming the file, exit status 1
    assert main(_args(sim_stores, tmp_path / "x", manifest=tmp_path / "nope.csv")) == 1
    assert "nope.csv" in capsys.readouterr().err
    assert main(_args(sim_stores, tmp_path / "y", audio=tmp_path)) == 1
    assert "not an embedding store" in capsys.readouterr().err
    assert main(_args(sim_stores, tmp_path / "z", "projector.in_dim=768")) == 1
    assert "384-d audio" in capsys.readouterr().err
