"""What the demo's stage-2 settings buy on a CPU: decoder depth and bf16 autocast, side by side.

The real SmolLM2-135M body (no LM head) runs a forward + backward pass on one batch of
input embeddings shaped like a stage-2 step (``--batch`` sequences of ``--tokens`` tokens; the
gradient reaches the inputs, as it reaches a trainable projector), in four settings measured in
the same run with alternating rounds (each setting's fastest round counts):

* every layer (30) in fp32 — the paper-shaped path on this LLM;
* every layer under bf16 autocast;
* the first ``--layers`` layers (``Backbone.keep_first_layers``) in fp32;
* the first ``--layers`` layers under bf16 autocast — what ``make demo`` trains with.

bf16 only pays where the CPU has native bf16 dot products (AVX512-BF16 / AMX); elsewhere
oneDNN emulates it and the ratio can fall below 1.

    python benchmarks/llm_depth_precision.py               # batch 16 x 100 tokens, 4 layers
    python benchmarks/llm_depth_precision.py --layers 2 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from respiramfm.llm.backbones import load_backbone


def step_seconds(decoder, x: torch.Tensor, mask: torch.Tensor, bf16: bool) -> float:
    inputs = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = decoder(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
    hidden[:, -1].float().pow(2).mean().backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    full = load_backbone("smollm2-135m")
    cut = copy.deepcopy(full).keep_first_layers(args.layers)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.tokens, full.hidden_size, generator=gen) * 0.02
    mask = torch.ones(args.batch, args.tokens, dtype=torch.long)
    settings = {"full_fp32": (full, False), "full_bf16": (full, True), "cut_fp32": (cut, False),
                "cut_bf16": (cut, True)}
    best = {k: float("inf") for k in settings}
    for name, (bb, bf16) in settings.items():  # warm-up, not timed
        step_seconds(bb.decoder(), x, mask, bf16)
    for _ in range(args.rounds):
        for name, (bb, bf16) in settings.items():
            best[name] = min(best[name], step_seconds(bb.decoder(), x, mask, bf16))
    print(json.dumps({
        "benchmark": "llm_depth_precision", "batch": args.batch, "tokens": args.tokens,
        "layers_full": full.num_layers, "layers_cut": args.layers, "threads": torch.get_num_threads(),
        "step_s": {k: round(v, 4) for k, v in best.items()},
        "bf16_speedup_full": round(best["full_fp32"] / best["full_bf16"], 2),
        "bf16_speedup_cut": round(best["cut_fp32"] / best["cut_bf16"], 2),
        "cut_speedup_fp32": round(best["full_fp32"] / best["cut_fp32"], 2),
        "demo_vs_full_fp32": round(best["full_fp32"] / best["cut_bf16"], 2),
    }))


if __name__ == "__main__":
    main()
