"""`respiramfm demo` (what `make demo` runs): the whole pipeline end to end, offline.

Embedded defaults, no files needed beyond the installed packages:

1. ``prepare simulated``   — the SIMULATED cohort (synthetic audio + correlated symptom text);
2. ``pretrain-audio``      — OPERA-style contrastive pretraining of a tiny HTS-AT on its train audio
                             (the released OPERA-CT weights cannot be fetched offline; pass
                             ``--opera-checkpoint`` to use them instead);
3. ``embed``               — front end + frozen encoder, cached embeddings;
4. ``embed-text``          — frozen SmolLM2-135M-Instruct text targets of every context;
5. ``align``               — stage 1, projector trained with InfoNCE, selected on validation.

Every stage is an ordinary subcommand, so each can be rerun alone; all outputs go under ``--out``
(``runs/demo`` by default). Stages resume: a second run reuses what the first computed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from respiramfm.cli import main as cli_main
from respiramfm.errors import RespiraMFMError
from respiramfm.utils.io import atomic_write_json

# The tiny HTS-AT the demo pretrains (embed 16, depths 1-1-2-1 -> 128-d latents).
PRETRAIN_DEFAULTS = [
    "encoder.embed_dim=16", "encoder.depths=[1,1,2,1]", "encoder.num_heads=[1,2,4,8]",
    "proj_dim=128", "crop_frames=50", "batch_size=32", "lr=1.0e-3", "lr_decay=0.99",
    "max_steps=40", "save_every=20", "seed=42",
]
ALIGN_DEFAULTS = ["epochs=200", "eval_every=10", "checkpoint_every=50", "seed=0"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="smaller cohort and shorter training (about 3 minutes)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed")
    parser.add_argument("--backbone", default="smollm2-135m", help="LLM for text targets (default: offline SmolLM2)")
    parser.add_argument("--opera-checkpoint", default=None,
                        help="use this OPERA-CT checkpoint instead of pretraining a tiny encoder")


def _stage(name: str, argv: list[str], timings: dict) -> None:
    print(f"\n== respiramfm {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = cli_main(argv)
    timings[name] = round(time.perf_counter() - t0, 1)
    if rc != 0:
        raise RespiraMFMError(f"stage '{name}' failed (exit code {rc}); rerun the command above to see why")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, timings = out / "data", {}
    manifest = data / "manifest.csv"

    sim = ["prepare", "simulated", "--out", str(data), "--seed", str(args.seed)]
    _stage("prepare", sim + (["--quick"] if args.quick else []), timings)

    if args.opera_checkpoint:
        checkpoint = args.opera_checkpoint
    else:
        steps = ["--set", "max_steps=20"] if args.quick else []
        pre = ["pretrain-audio", "--resume", "--manifest", str(manifest), "--out", str(out / "encoder")]
        for o in PRETRAIN_DEFAULTS:
            pre += ["--set", o]
        _stage("pretrain-audio", pre + steps, timings)
        checkpoint = str(out / "encoder" / "encoder.safetensors")

    _stage("embed", ["embed", "--manifest", str(manifest), "--encoder", "opera-ct", "--checkpoint", checkpoint,
                     "--out", str(out / "audio_emb"), "--no-progress"], timings)
    _stage("embed-text", ["embed-text", "--manifest", str(manifest), "--out", str(out / "text_emb"),
                          "--backbone", args.backbone], timings)

    from respiramfm.encoders.store import EmbeddingStore

    audio_dim = EmbeddingStore(out / "audio_emb").dim
    align = ["align", "--set", f"projector.in_dim={audio_dim}", "--set", f"audio_store={out / 'audio_emb'}", "--set", f"text_store={out / 'text_emb'}",
             "--set", f"manifest={manifest}", "--set", f"out_dir={out / 'align'}", "--set", "progress=false"]
    for o in ALIGN_DEFAULTS + (["epochs=60"] if args.quick else []):
        align += ["--set", o]
    _stage("align", align, timings)

    summary = {"simulated": True, "out": str(out), "seconds": timings, "total_seconds": round(sum(timings.values()), 1)}
    metrics = out / "align" / "summary.json"
    if metrics.exists():
        summary["align"] = json.loads(metrics.read_text())
    atomic_write_json(out / "demo_summary.json", summary)
    print("\n== demo finished (SIMULATED data: no evidence about real patients)")
    print(f"   outputs under {out}/ ; summary: {out / 'demo_summary.json'}")
    print(f"   stage timings (s): {timings}")
    print("   stage 2 (LLM fine-tuning), evaluation and the report are not implemented yet;"
          " the demo stops after stage 1.")
    return 0
