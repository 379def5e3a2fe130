"""docs/own-data.md, followed end to end: every command of the guide runs, in order, on a tiny fake tree.

The commands are read from the guide's ``sh`` blocks and its task file from its ``yaml`` block, so the
guide cannot drift from the code. The tree holds what the guide starts from: a folder of recordings with
a metadata sheet (synthetic audio, its recording device confounded with the label on purpose), and the
public-copy layouts of ICBHI (cycle segments, cut from the shared real recordings) and KAUH (middle-10-s
copies of shared real recordings). The only changes to the commands are for speed: a tiny LLM saved as a
local model folder instead of SmolLM2, one thread, and shorter training (``TEST_ONLY`` below).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shlex
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from respiramfm.cli import main
from respiramfm.data.records import read_manifest
from respiramfm.llm.backbones import tiny_backbone

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own-data.md"
TEST_ONLY = {  # extra --set per stage: small and fast, never changing what the command means
    "align": ["epochs=4", "eval_every=2", "checkpoint_every=2", "figure=false"],
    "finetune": ["model.num_layers=0", "precision=fp32", "epochs=2", "batch_size=4", "eval_batch_size=8"],
    "evaluate": ["n_boot=20"],
}
KAUH_FILES = ["BP17_COPD,E W,A R M,57,M.wav", "BP25_copd,E W,P L L,76,M.wav", "BP30_N,N,P R M,18,F.wav",
              "BP1_Asthma,I E W,P L L,70,M.wav"]


def guide_commands(text: str) -> list[str]:
    """Every command of the guide's ``sh`` blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            if cmd.strip():
                out.append(" ".join(cmd.split()))
    return out


def guide_files(text: str) -> dict[str, str]:
    """The guide's ``yaml`` blocks that start with ``# NAME.yaml``."""
    files = {}
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        first = block.splitlines()[0]
        if first.startswith("# ") and first.endswith(".yaml"):
            files[first[2:].strip()] = block
    return files


def build_clinic(root: Path, n_patients: int = 12) -> None:
    """``clinic/audio/pNN_{a,b}.wav`` + ``clinic/metadata.csv`` as the guide shows them (device = label)."""
    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True)
    rows = ["file,subject,diagnosis,age,sex,device,symptoms"]
    t = np.arange(int(1.5 * 16000)) / 16000
    for i in range(1, n_patients + 1):
        copd = i % 2 == 1
        for part in "ab":
            noise = rng.normal(0, 0.1, t.size)
            wave = (np.convolve(noise, np.ones(8) / 8, "same") + 0.2 * np.sin(2 * np.pi * 400 * t)) if copd else noise
            name = f"audio/p{i:02d}_{part}.wav"
            sf.write(root / name, wave.astype(np.float32), 16000, subtype="PCM_16")
            rows.append(f"{name},p{i:02d},{'copd' if copd else 'control'},{70 + i if copd else 30 + i},"
                        f"{'m' if i % 3 else 'f'},{'StethA' if copd else 'StethB'},"
                        f"{'wheezing;breathless on stairs' if copd else 'none'}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")


def build_public(shared: Path, root: Path) -> None:
    """``public/icbhi`` (cycle segments) and ``public/kauh/Audio Files Test`` (middle 10 s, three filters)."""
    spec = importlib.util.spec_from_file_location("public_copies", ROOT / "tests" / "data" / "test_public_copies.py")
    copies = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copies)
    copies.build_icbhi_segments(shared, root / "icbhi", cycles=2)
    audio = root / "kauh" / "Audio Files Test"
    audio.mkdir(parents=True)
    for name in KAUH_FILES:
        wave, sr = sf.read(shared / "kauh" / "AudioFiles" / name, dtype="float32")
        stem, rest = name[:-4].split("_", 1)
        for k, f in enumerate("BDE"):
            sf.write(audio / f"{f}{stem[1:]}_{rest}_middle10sec.wav", wave[sr: 4 * sr] * (1.0 - 0.1 * k), sr,
                     subtype="PCM_16")


def for_test(cmd: str, tiny_dir: Path) -> str:
    cmd = cmd.replace("smollm2-135m", str(tiny_dir)).replace("--num-layers 4", "--num-layers 0")
    cmd = cmd.replace("--threads 2", "--threads 1").replace("threads=2", "threads=1")
    stage = cmd.split()[1]
    extra = TEST_ONLY.get(stage, []) + ([f"model.backbone={tiny_dir}"] if stage == "finetune" else [])
    return cmd + "".join(f" --set {shlex.quote(e)}" for e in extra)


def serve_once(argv: list[str], monkeypatch) -> dict:
    """``respiramfm serve`` through the CLI in-process: the app it builds is served on a free port by the
    package's own background-thread runner, /health and /tasks are read, and the server stops."""
    from respiramfm.serve import app as serve_app

    built = {}
    real_create = serve_app.create_app
    with monkeypatch.context() as m:
        m.setattr(serve_app, "create_app", lambda *a, **k: built.setdefault("app", real_create(*a, **k)))
        m.setattr(serve_app.uvicorn.Server, "run", lambda server, *a, **k: built.setdefault("port", server.config.port))
        assert main(argv) == 0
    assert built["port"] == 8000  # the guide's port reached the server config
    with serve_app.running_server(built["app"]) as base:
        with urllib.request.urlopen(f"{base}/health", timeout=30) as r:
            health = json.loads(r.read())
        with urllib.request.urlopen(f"{base}/tasks", timeout=30) as r:
            return {"health": health, "tasks": json.loads(r.read())}


@pytest.mark.slow
def test_guide_end_to_end(shared_data, tmp_path, monkeypatch, capsys):
    text = DOC.read_text(encoding="utf-8")
    commands = guide_commands(text)
    stages = [c.split()[1] for c in commands]
    for needed in ("prepare", "tasks", "audit", "merge", "embed", "embed-text", "align", "finetune", "evaluate",
                   "predict", "serve"):
        assert needed in stages, f"the guide has no `respiramfm {needed}`"
    assert all(c.startswith("respiramfm ") for c in commands)
    monkeypatch.chdir(tmp_path)
    for name, body in guide_files(text).items():
        (tmp_path / name).write_text(body)
    build_clinic(tmp_path / "clinic")
    build_public(shared_data, tmp_path / "public")
    tiny_dir = tmp_path / "tiny-llm"
    bb = tiny_backbone("llama", num_layers=2)
    bb.model.save_pretrained(tiny_dir)
    bb.tokenizer.save_pretrained(tiny_dir)

    outputs, threads = [], torch.get_num_threads()
    for cmd in commands:
        argv = shlex.split(for_test(cmd, tiny_dir))[1:]
        if argv[0] == "serve":
            served = serve_once(argv, monkeypatch)
            continue
        code = main(argv)
        torch.set_num_threads(threads)
        got = capsys.readouterr()
        assert code == 0, f"{cmd}\n{got.err[-3000:]}"
        outputs.append((cmd, got.out, got.err))

    own = tmp_path / "runs" / "own"
    clinic = read_manifest(own / "clinic.csv")
    assert len(clinic) == 24 and {r.diagnosis for r in clinic} == {"copd", "healthy"}
    assert {r.split for r in clinic} == {"train", "val", "test"}
    assert {r.split for r in read_manifest(own / "kauh.csv")} == {"test"}
    merged = read_manifest(own / "all.csv")
    assert {r.dataset for r in merged} == {"clinic", "kauh"} and len(merged) == 24 + 12

    out_of = {c.split()[1] + (" " + c.split()[2] if c.split()[1] == "audit" else ""): (o, e) for c, o, e in outputs}
    assert "evaluates CLINIC-COPD and trains on CLINIC-COPD" in out_of["tasks"][0]
    audit_clinic = out_of["audit runs/own/clinic.csv"][0]
    assert re.search(r"^device .*<-- shortcut\?", audit_clinic, flags=re.M), audit_clinic
    assert json.loads((own / "kauh_audit.json").read_text())["audits"][0]["task"] == "T7"
    assert "embed logmel-stats: 36/36 clip (100 %)" in out_of["embed"][1]  # --no-progress: plain lines
    assert "embed-text:" in out_of["embed-text"][1]

    ev = own / "evaluate"
    results_md = (ev / "results.md").read_text()
    assert "Shortcut warnings" in results_md and "CLINIC-COPD: device alone predicts" in results_md
    assert "Shortcut warnings" in (ev / "report.html").read_text()
    assert not (ev / "work" / "respiramfm" / "seed0" / "finetune").exists()  # finetune_run: not trained again
    with open(ev / "predictions" / "respiramfm" / "seed0.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["task"] for r in rows} == {"CLINIC-COPD", "T7"}
    assert all(r["patient"].count("/") == 1 for r in rows), rows[:3]  # kauh/P17, not kauh/kauh/P17

    single = json.loads([c for c in outputs if c[0].startswith("respiramfm predict") and "--audio" in c[0]][0][1])
    assert 0.0 <= single["probability"] <= 1.0 and single["task"] == "CLINIC-COPD"
    with open(own / "clinic_predictions.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 24
    batch = json.loads([c for c in outputs if "--manifest runs/own/clinic.csv" in c[0]][0][1])
    assert batch["predicted"] == 24 and 0.0 <= batch["metrics"]["auroc"]["auroc"] <= 1.0  # labels present: a metric
    assert served["health"] and any("CLINIC-COPD" in json.dumps(t) for t in [served["tasks"]])
