"""Stage-1 training speed: the official recipe on synthetic cached pairs, ours vs a plain DataLoader loop.

Recipe (docs/paper.md §4): batch 64, Adam lr 1e-3, 500 epochs, audio→text InfoNCE τ = 0.07,
projector 768→1024→d with LayerNorm+ReLU heads. Data: ``--pairs`` training pairs of a
768-d audio embedding and a d-dim text target (576 = SmolLM2-135M hidden size, 2560 = Phi-2),
plus 1,000 validation pairs; audio is a noisy linear map of text so the run learns something.

"ours" is :func:`respiramfm.align.train.train_align` exactly as ``respiramfm align`` runs it
with ``configs/paper/align.yaml`` (evaluation and checkpoint every 10 epochs included).
"dataloader" is the straightforward implementation — a ``Dataset`` returning one
``torch.tensor`` pair per item, ``DataLoader(batch_size=64, shuffle=True)``, torch's default
Adam — timed for ``--baseline-epochs`` epochs and extrapolated to the full recipe.

The JSON line also carries the arithmetic floor: forward+backward of the two Linear layers
costs ``6·(768·1024 + 1024·d)`` FLOPs per pair, so 500 epochs of 10,000 pairs is ~41 TFLOP
at d = 576 and ~93 TFLOP at d = 2560 — what "achieved_gflops" should be read against.

    python benchmarks/align.py                     # full recipe (minutes on 2 cores)
    python benchmarks/align.py --epochs 3          # quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from respiramfm.align.data import AlignData, pairset_from_arrays
from respiramfm.models.configuration import ProjectorConfig
from respiramfm.models.projector import build_projector
from respiramfm.align.train import AlignConfig, train_align
from respiramfm.config import load_config

AUDIO_DIM = 768
OFFICIAL = Path(__file__).resolve().parents[1] / "configs" / "paper" / "align.yaml"


def synth(n: int, d_text: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(size=(d_text, AUDIO_DIM)).astype(np.float32) / np.sqrt(d_text)
    text = rng.normal(size=(n, d_text)).astype(np.float32)
    audio = text @ w + 0.5 * rng.normal(size=(n, AUDIO_DIM)).astype(np.float32)
    return audio, text


class _PairDataset(torch.utils.data.Dataset):
    """What the official code does: numpy arrays in memory, one torch.tensor per item."""

    def __init__(self, audio: np.ndarray, text: np.ndarray):
        self.audio, self.text = audio, text

    def __len__(self) -> int:
        return len(self.audio)

    def __getitem__(self, i):
        return torch.tensor(self.audio[i], dtype=torch.float32), torch.tensor(self.text[i], dtype=torch.float32)


def dataloader_epochs_per_s(audio: np.ndarray, text: np.ndarray, epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    model = build_projector(ProjectorConfig(out_dim=text.shape[1]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(_PairDataset(audio, text), batch_size=64, shuffle=True)
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for a, t in loader:
            logits = F.normalize(model(a), dim=1) @ F.normalize(t, dim=1).T / 0.07
            loss = F.cross_entropy(logits, torch.arange(a.shape[0]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return epochs / (time.perf_counter() - t0)


def ours(audio, text, val_audio, val_text, epochs: int, seed: int) -> tuple[float, float, dict]:
    """(whole train_align wall time, its epoch-loop time incl. evals/checkpoints, best metrics)."""
    data = AlignData(pairset_from_arrays(audio, text), pairset_from_arrays(val_audio, val_text))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(AlignConfig, OFFICIAL, [f"out_dir={tmp}", f"epochs={epochs}", f"seed={seed}",
                                                  "progress=false", "figure=false"])
        t0 = time.perf_counter()
        res = train_align(cfg, data)
        return time.perf_counter() - t0, res.summary["train_seconds_this_run"], res.best_metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=500)
    ap.add_argument("--text-dims", default="576,2560", help="comma-separated text target widths")
    ap.add_argument("--baseline-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--target-s", type=float, default=60.0)
    ap.add_argument("--recipe-epochs", type=int, default=500, help="epochs of the full recipe (for extrapolation)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for d in [int(x) for x in args.text_dims.split(",")]:
        audio, text = synth(args.pairs, d, seed=0)
        val_audio, val_text = synth(1000, d, seed=1)
        total, loop, best = ours(audio, text, val_audio, val_text, args.epochs, seed=0)
        base_eps = dataloader_epochs_per_s(audio, text, args.baseline_epochs, seed=0)
        ours_eps = args.epochs / loop
        # fixed costs (data fingerprint, epoch-0 eval, final save) + the loop scaled to the full recipe
        recipe_s = total if args.epochs == args.recipe_epochs else (total - loop) + args.recipe_epochs / ours_eps
        flop = 6.0 * (AUDIO_DIM * 1024 + 1024 * d) * args.pairs * args.epochs
        results[str(d)] = {
            "ours_s": round(total, 2), "ours_epochs_per_s": round(ours_eps, 4),
            "ours_recipe_s": round(recipe_s, 1), "extrapolated": args.epochs != args.recipe_epochs,
            "dataloader_epochs_per_s": round(base_eps, 4),
            "dataloader_recipe_s": round(args.recipe_epochs / base_eps, 1),
            "speedup_vs_dataloader": round(ours_eps / base_eps, 3),
            "meets_target": recipe_s < args.target_s,
            "tflop_recipe": round(flop * args.recipe_epochs / args.epochs / 1e12, 1),
            "achieved_gflops": round(flop / loop / 1e9, 1),
            "val_r1": round(best["r1"], 4), "chance_r1": round(best["chance_r1"], 4),
        }
    print(json.dumps({"benchmark": "align", "recipe": "batch64 adam1e-3 infonce0.07 official-mlp",
                      "pairs": args.pairs, "epochs": args.epochs, "baseline_epochs": args.baseline_epochs,
                      "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "target_s": args.target_s,
                      "torch": torch.__version__, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
