"""Evidence run (not collected by pytest): stage-1 alignment on the SIMULATED cohort.

Compares, on validation only (test rows are never read), the projector's final head
(official LayerNorm+ReLU vs signed LayerNorm), the text-target space (hidden_mean,
input_mean, last_token) and the loss (infonce, clip, dup_aware), each over several seeds,
and prints one JSON document with mean ± std of R@1, R@5, MRR and validation loss at the
selected epoch, next to chance. Build the inputs first::

    respiramfm prepare simulated --out COHORT
    respiramfm embed --manifest COHORT/manifest.csv --encoder logmel-stats --out AUDIO
    respiramfm embed-text --manifest COHORT/manifest.csv --out TEXT_hidden_mean --space hidden_mean
    respiramfm embed-text --manifest COHORT/manifest.csv --out TEXT_input_mean --space input_mean
    python tests/align/evidence_simulated.py --manifest COHORT/manifest.csv --audio AUDIO \\
        --text hidden_mean=TEXT_hidden_mean --text input_mean=TEXT_input_mean --out RUNS

Simulated data are no evidence about patients; they show the code learns what the
simulation put there, and how the design choices compare on it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

from respiramfm.align.data import load_align_data
from respiramfm.align.train import AlignConfig, train_align
from respiramfm.data.roles import run_tasks

KEYS = ("r1", "r5", "mrr", "val_loss", "chance_r1", "chance_r5", "alignment", "uniformity")


def _mean_std(rows: list[dict], key: str) -> list[float]:
    vals = [r[key] for r in rows]
    return [round(statistics.fmean(vals), 4), round(statistics.pstdev(vals), 4)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--audio", required=True, help="audio embedding store")
    ap.add_argument("--text", action="append", required=True, metavar="SPACE=DIR", help="text store per space")
    ap.add_argument("--out", required=True)
    ap.add_argument("--finals", default="official,layernorm")
    ap.add_argument("--losses", default="infonce")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=500)
    ap.add_argument("--select", default="val_loss")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    stores = dict(item.split("=", 1) for item in args.text)
    results = []
    for space, store in stores.items():
        tasks = run_tasks([str(Path(args.manifest).parent / "tasks.yaml")])  # the cohort's SIM-T1..T9
        data = load_align_data(args.manifest, args.audio, store, tasks=tasks)
        for final, loss in itertools.product(args.finals.split(","), args.losses.split(",")):
            runs = []
            for seed in range(args.seeds):
                out = Path(args.out) / f"{space}-{final}-{loss}-s{seed}"
                cfg = AlignConfig(out_dir=str(out), loss=loss, epochs=args.epochs, eval_every=10, seed=seed,
                                  select_metric=args.select, progress=False, figure=(seed == 0), threads=args.threads)
                cfg.projector.in_dim = data.audio_dim
                cfg.projector.final = final
                res = train_align(cfg, data)
                runs.append(dict(res.best_metrics, best_epoch=res.best_epoch,
                                 silhouette=(res.summary.get("figure") or {}).get("silhouette_after"),
                                 silhouette_before=(res.summary.get("figure") or {}).get("silhouette_before")))
            row = {"space": space, "final": final, "loss": loss, "n_train": len(data.train), "n_val": len(data.val),
                   "best_epochs": [r["best_epoch"] for r in runs]}
            row.update({k: _mean_std(runs, k) for k in KEYS})
            row["silhouette_after_seed0"] = runs[0]["silhouette"]
            row["silhouette_before"] = runs[0]["silhouette_before"]
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"evidence": "align on SIMULATED cohort", "select_metric": args.select, "epochs": args.epochs,
                      "seeds": args.seeds, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
