"""`respiramfm demo` (what `make demo` runs): the whole pipeline end to end, offline.

Embedded defaults, no files needed beyond the installed packages:

1. ``prepare simulated``   — the SIMULATED cohort (synthetic audio + correlated symptom text);
2. ``embed``               — OPERA front end + a frozen encoder, cached embeddings. The released
                             OPERA-CT weights cannot be fetched offline, so the default encoder is
                             ``logmel-stats`` (statistics of OPERA's log-mel spectrogram);
                             ``--pretrain-encoder`` instead pretrains a tiny HTS-AT OPERA-style
                             (``pretrain-audio``) and ``--opera-checkpoint`` uses the real weights;
3. ``embed-text``          — frozen SmolLM2-135M-Instruct text targets of every context;
4. ``align``               — stage 1, projector trained with InfoNCE, selected on validation;
5. ``finetune``            — stage 2, SmolLM2 + LoRA + linear head on the supervised tasks, selected on
                             validation (the selected model is copied to ``OUT/model``);
6. ``evaluate``            — the T1-T9 protocol on the simulated tasks: RespiraMFM (reusing step 5 for
                             the first seed), the no-alignment ablation, RespLLM, the unimodal models,
                             RespiraMFM with the text missing and the BTS-style baseline over seeds,
                             AUROC with patient-level bootstrap CIs, the BTS-style data-efficiency
                             curve, then the self-contained report ``OUT/report.html``.

Stage 2 is sized for two CPU cores (10 LLM trainings in the full demo, about 8 minutes): the LLM keeps its
first ``--llm-layers`` (4) of 30 decoder layers (stage 1's text targets come from the same
cut LLM), trains under bf16 autocast, and reads the paper's
input order [audio | prompt | context], so its last token (the one the head reads) follows the
symptom text. ``--llm-layers 0`` keeps every layer. ``--data-root DIR`` runs the paper's T1-T9 on
real datasets instead (:mod:`respiramfm.demo_real`).

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
# Stage 2 on SmolLM2-135M, sized for two CPU cores (shared by every system of the evaluation).
FINETUNE_DEFAULTS = [
    "model.order=[audio, prompt, context]", "precision=bf16", "group_by_task=false",
    "model.lora.r=8", "model.lora.alpha=16", "optim.lr=5.0e-4", "optim.warmup_steps=5", "optim.weight_decay=0.0",
    "batch_size=16", "eval_every=0", "eval_batch_size=32", "patience=0", "checkpoint_every=1000", "log_every=10",
    "threads=2",
]
SYSTEMS = ["respiramfm", "no_alignment", "respllm", "text_only", "audio_only", "missing_text", "bts_frozen"]
# Two seeds keep the full demo (10 LLM trainings) within 10 minutes on 2 cores; the protocol's default is 3.
FULL = {"epochs": 2, "seeds": [0, 1], "systems": SYSTEMS, "n_boot": 1000, "efficiency": "bts_frozen"}
QUICK = {"epochs": 2, "seeds": [0], "systems": ["respiramfm", "no_alignment", "respllm", "bts_frozen"],
         "n_boot": 300, "efficiency": ""}
# The end-to-end baselines (RespLLM, no-alignment) get the same epochs and batch size as RespiraMFM.
E2E = "{epochs: %d, batch_size: 16, lr: 5.0e-4, patience: 0}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="smaller cohort and shorter training")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed")
    parser.add_argument("--backbone", default=None,
                        help="LLM of both stages (default: the offline SmolLM2; phi-2 with --data-root)")
    parser.add_argument("--llm-layers", type=int, default=None,
                        help="keep the LLM's first N decoder layers in stage 2 (default 4 on the simulated "
                             "cohort, 0 = all; all with --data-root)")
    parser.add_argument("--opera-checkpoint", default=None, help="embed with this OPERA-CT checkpoint")
    parser.add_argument("--pretrain-encoder", action="store_true",
                        help="pretrain a tiny HTS-AT OPERA-style on the cohort instead of the logmel-stats encoder")
    parser.add_argument("--efficiency", default=None, metavar="SYSTEM",
                        help="system of the data-efficiency curve (default bts_frozen; none with --quick; "
                             "'respiramfm' retrains stage 2 per fraction: about 3 more minutes)")
    parser.add_argument("--data-root", default=None,
                        help="real datasets laid out as published (icbhi/, kauh/, ...): the paper's T1-T9")


def _stage(name: str, argv: list[str], timings: dict) -> None:
    print(f"\n== respiramfm {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = cli_main(argv)
    timings[name] = round(time.perf_counter() - t0, 1)
    if rc != 0:
        raise RespiraMFMError(f"stage '{name}' failed (exit code {rc}); rerun the command above to see why")


def run(args: argparse.Namespace) -> int:
    if args.data_root:
        from respiramfm.demo_real import run_real

        args.backbone = args.backbone or "phi-2"
        args.llm_layers = args.llm_layers or 0
        return run_real(args)
    args.backbone = args.backbone or "smollm2-135m"
    args.llm_layers = 4 if args.llm_layers is None else args.llm_layers
    if args.llm_layers < 0:
        raise RespiraMFMError(f"--llm-layers must be >= 0, got {args.llm_layers}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, timings = out / "data", {}
    manifest = data / "manifest.csv"

    sim = ["prepare", "simulated", "--out", str(data), "--seed", str(args.seed)]
    _stage("prepare", sim + (["--quick"] if args.quick else []), timings)

    encoder = ["--encoder", "logmel-stats"]
    if args.opera_checkpoint:
        encoder = ["--encoder", "opera-ct", "--checkpoint", args.opera_checkpoint]
    elif args.pretrain_encoder:
        steps = ["--set", "max_steps=20"] if args.quick else []
        pre = ["pretrain-audio", "--resume", "--manifest", str(manifest), "--out", str(out / "encoder")]
        for o in PRETRAIN_DEFAULTS:
            pre += ["--set", o]
        _stage("pretrain-audio", pre + steps, timings)
        encoder = ["--encoder", "opera-ct", "--checkpoint", str(out / "encoder" / "encoder.safetensors")]

    _stage("embed", ["embed", "--manifest", str(manifest), *encoder, "--out", str(out / "audio_emb"), "--no-progress"],
           timings)
    _stage("embed-text", ["embed-text", "--manifest", str(manifest), "--out", str(out / "text_emb"),
                          "--backbone", args.backbone, "--num-layers", str(args.llm_layers)], timings)

    from respiramfm.encoders.store import EmbeddingStore

    audio_dim = EmbeddingStore(out / "audio_emb").dim
    align = ["align", "--set", f"projector.in_dim={audio_dim}", "--set", f"audio_store={out / 'audio_emb'}", "--set", f"text_store={out / 'text_emb'}",
             "--set", f"manifest={manifest}", "--set", f"out_dir={out / 'align'}", "--set", "progress=false"]
    for o in ALIGN_DEFAULTS + (["epochs=60"] if args.quick else []):
        align += ["--set", o]
    _stage("align", align, timings)

    plan = QUICK if args.quick else FULL
    ft = FINETUNE_DEFAULTS + [f"epochs={plan['epochs']}", "progress=false", f"model.backbone={args.backbone}",
                              f"model.num_layers={args.llm_layers}"]
    tasks = _supervised(data / "tasks.yaml")
    inputs = {"manifests": f"[{manifest}]", "task_files": f"[{data / 'tasks.yaml'}]",
              "audio_store": f"[{out / 'audio_emb'}]", "projector": str(out / "align")}
    first = plan["seeds"][0]
    fine = ["finetune"] + _sets({**inputs, "tasks": f"[{','.join(tasks)}]", "seed": first,
                                 "out_dir": str(out / "finetune" / f"seed{first}")}) + _sets(ft)
    _stage("finetune", fine, timings)
    _copy_model(out / "finetune" / f"seed{first}" / "model", out / "model")

    e2e = E2E % plan["epochs"]
    run = out / "finetune" / "seed{seed}"  # shared: missing_text is RespiraMFM's own model without the text
    options = ("{respiramfm: {finetune_dir: '%s'}, missing_text: {finetune_dir: '%s'}, respllm: {e2e: %s}, "
               "no_alignment: {e2e: %s}}" % (run, run, e2e, e2e))
    ev = ["evaluate"] + _sets({**inputs, "text_store": str(out / "text_emb"), "seeds": plan["seeds"],
                               "systems": f"[{','.join(_available(plan['systems']))}]", "n_boot": plan["n_boot"],
                               "out_dir": str(out / "evaluate"), "quick": bool(args.quick),
                               "systems_options": options})
    efficiency = plan["efficiency"] if args.efficiency is None else args.efficiency
    if efficiency:  # by default a cheap system: the LLM ones would not fit the 10-minute budget
        ev += _sets({"data_efficiency": efficiency})
    ev += _sets([f"finetune.{o}" for o in ft])
    _stage("evaluate", ev, timings)
    summary = {"simulated": True, "audio_encoder": encoder[1], "llm": args.backbone,
               "llm_layers": args.llm_layers or "all", "systems": plan["systems"], "seeds": plan["seeds"]}
    return finish(out, summary, timings, "(SIMULATED data: no evidence about real patients)")


def finish(out: Path, summary: dict, timings: dict, headline: str) -> int:
    """Copy the report to ``OUT/report.html``, write ``OUT/demo_summary.json`` and print where things are."""
    report = out / "report.html"
    _copy_report(out / "evaluate", report)
    summary = {**summary, "out": str(out), "seconds": timings, "total_seconds": round(sum(timings.values()), 1),
               "model": str(out / "model"), "report": str(report)}
    metrics = out / "align" / "summary.json"
    if metrics.exists():
        summary["align"] = json.loads(metrics.read_text())
    atomic_write_json(out / "demo_summary.json", summary)
    print(f"\n== demo finished {headline}")
    print(f"   outputs under {out}/ ; summary: {out / 'demo_summary.json'}")
    results = out / "evaluate" / "results.md"
    if results.exists():
        print("\n" + results.read_text())
    print(f"   stage timings (s): {timings}")
    print(f"   trained model: {out / 'model'}")
    print(f"   report: {report}")
    return 0


def _sets(items) -> list[str]:
    """``--set`` arguments from a dict (key -> value, lists as YAML) or a list of 'k=v' strings."""
    pairs = [f"{k}={_yaml(v)}" for k, v in items.items()] if isinstance(items, dict) else list(items)
    return [a for p in pairs for a in ("--set", p)]


def _yaml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


def _supervised(tasks_yaml: Path) -> list[str]:
    from respiramfm.evaluate.protocol import select_tasks

    return [n for n, t in select_tasks([], [str(tasks_yaml)]).items() if t.role == "supervised"]


def _available(systems: list[str]) -> list[str]:
    """The demo's systems that are registered (the baselines module may be absent in a trimmed install)."""
    from respiramfm.errors import ConfigError
    from respiramfm.evaluate.protocol import get_system

    keep = []
    for name in systems:
        try:
            get_system(name)
            keep.append(name)
        except ConfigError:
            print(f"   (system {name!r} is not available; skipped)")
    return keep


def _copy_model(src: Path, dest: Path) -> None:
    """Replace ``dest`` with a copy of the saved model directory (copy, then rename)."""
    import shutil

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _copy_report(eval_dir: Path, dest: Path) -> None:
    from respiramfm.utils.io import atomic_write_bytes

    atomic_write_bytes(dest, (eval_dir / "report.html").read_bytes())
