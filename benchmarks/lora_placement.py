"""Quality cost of LoRA on the top k layers (frozen-trunk cache) against LoRA on every layer, full depth.

Two runs of the offline demo's pipeline on the SIMULATED cohort, identical except for the
LoRA placement of stage 2 (the full SmolLM2-135M, all 30 layers, in both):

* ``top{k}``: LoRA on the top ``k`` layers, trained through the frozen-trunk cache
  (``model.lora.top_layers=k``, ``trunk_cache=true``);
* ``every_layer``: LoRA on every layer (the paper's placement), uncached.

Both use the demo's stage-2 settings otherwise (``configs/cpu/finetune.yaml``: bf16, batch 16,
lr 5e-4, the same epochs), the same cohort, encoder and text targets (the second run starts from a
copy of the first run's data and embedding stages; its stage 1 runs again with the same seed), and
are scored by the protocol (``respiramfm`` only, test split, selection on validation).
Printed: one JSON line with the mean supervised and zero-shot test AUROC of each, per task,
the differences (top-k minus every layer) and each run's training seconds (a shared machine
makes those indicative only).

    python benchmarks/lora_placement.py [--out DIR] [--quick] [--top 4] [--seeds 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from respiramfm.pipeline.presets import simulated  # noqa: E402
from respiramfm.pipeline.recipe import run_pipeline  # noqa: E402

SHARED = ("data", "audio_emb", "text_emb")  # stages both runs share (copied, then resumed as done; stage 1 reruns: same seed)


def arm_config(out: Path, top: int, quick: bool, seeds: list[int], epochs: int | None, threads: int):
    cfg = simulated(quick=quick, out=str(out), llm_layers=0)  # the full LLM in both stages
    cfg.threads = threads
    ft = cfg.finetune
    ft.model.lora.top_layers = int(top)
    ft.trunk_cache = top > 0
    ft.accept_eval_trunk = top > 0  # LoRA dropout sits in the top layers only; SmolLM2 has no trunk dropout
    ft.trunk_cache_dir = str(out.parent / "trunk_cache")
    ft.precision = "auto"  # bf16 only where this CPU has native bf16 (training/engine.py: resolve_precision)
    if epochs:
        ft.epochs = int(epochs)
    ev = cfg.evaluate
    ev.systems, ev.seeds, ev.n_boot, ev.data_efficiency = ["respiramfm"], list(seeds), 200, ""
    return cfg


def scores(out: Path) -> dict:
    res = json.loads((out / "evaluate" / "results.json").read_text())
    tasks = {r["task"]: round(float(r["mean"]), 4) for r in res["rows"]
             if r.get("system") == "respiramfm" and r.get("mean") is not None}
    avg = {g: round(float(a["mean"]), 4) for g, a in res["averages"].get("respiramfm", {}).items()
           if a.get("mean") is not None}
    return {"mean_auroc": avg, "auroc": tasks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--quick", action="store_true", help="the quick cohort (310 recordings)")
    ap.add_argument("--top", type=int, default=4, help="k of the top-k placement")
    ap.add_argument("--seeds", default="0", help="comma-separated evaluation seeds")
    ap.add_argument("--epochs", type=int, default=0, help="stage-2 epochs (0 = the demo's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="lora_placement_")
    root = Path(args.out or tmp.name)
    top_out, every_out = root / f"top{args.top}", root / "every_layer"
    quiet = lambda *a, **k: None  # noqa: E731
    t0 = time.perf_counter()
    top = run_pipeline(arm_config(top_out, args.top, args.quick, seeds, args.epochs, args.threads), log=quiet)
    t_top = time.perf_counter() - t0
    every_out.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if not (every_out / name).exists():
            shutil.copytree(top_out / name, every_out / name)
    t0 = time.perf_counter()
    every = run_pipeline(arm_config(every_out, 0, args.quick, seeds, args.epochs, args.threads), log=quiet)
    t_every = time.perf_counter() - t0
    a, b = scores(top_out), scores(every_out)
    line = {"benchmark": "lora_placement", "llm": "smollm2-135m (30 of 30 layers)", "cohort": "SIMULATED",
            "quick": args.quick, "seeds": seeds, f"top{args.top}_cached": a, "every_layer": b,
            "delta_mean_auroc": {g: round(a["mean_auroc"][g] - b["mean_auroc"][g], 4)
                                 for g in a["mean_auroc"] if g in b["mean_auroc"]},
            "delta_auroc": {t: round(a["auroc"][t] - b["auroc"][t], 4) for t in a["auroc"] if t in b["auroc"]},
            "seconds": {f"top{args.top}_cached": {"total": round(t_top, 1), **top.get("seconds", {})},
                        "every_layer": {"total": round(t_every, 1), **every.get("seconds", {})}},
            "threads": args.threads}
    print(json.dumps(line))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
