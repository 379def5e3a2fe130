"""Text-target throughput: padded batches vs one text at a time, same backbone, same texts.

The official code embeds each context alone; we batch with padding and a
mask-weighted mean (identical vectors to float rounding, see tests/llm). This
measures what batching buys, plus the cached-load time of the offline default.
Prints ONE JSON line.

    python benchmarks/text_targets.py                   # SmolLM2-135M, 64 contexts, batch 16
    python benchmarks/text_targets.py --n 256 --batch-size 32 --backbone path/to/phi-2
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

SEXES = ["Gender: female. ", "Gender: male. ", ""]
SYMPTOMS = ["dry cough", "wet cough", "fever", "sore throat", "difficulty breathing or feeling short of breath",
            "muscle aches", "loss of taste and smell", "headache", "tightness in the chest"]
HISTORY = ["asthma", "COPD/emphysema", "high blood pressure", "diabetes", "other lung disease"]


def make_contexts(n: int, seed: int = 0) -> list[str]:
    """Deterministic contexts in the RespLLM-style template, of varied length."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = rng.choice(SEXES) + f"Age: {rng.randint(1, 90)}. "
        hist = rng.sample(HISTORY, rng.randint(0, 2))
        text += ("Patient presents with the following medical history conditions: " + ", ".join(hist) + ". "
                 if hist else "Patient presents with no medical history conditions. ")
        sym = rng.sample(SYMPTOMS, rng.randint(0, 5))
        text += ("Patient presents with the following respiratory symptoms: " + ", ".join(sym) + ". "
                 if sym else "Patient presents with no obvious respiratory symptoms.")
        out.append(text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--space", default="hidden_mean")
    args = parser.parse_args()

    from respiramfm.llm.backbones import load_backbone
    from respiramfm.llm.text_embed import text_targets

    load_backbone(args.backbone)  # make sure any one-off conversion is done before timing the load
    t0 = time.perf_counter()
    bb = load_backbone(args.backbone)
    load_s = time.perf_counter() - t0
    texts = make_contexts(args.n)
    text_targets(bb, texts[:2], args.space)  # warm-up

    t0 = time.perf_counter()
    single = torch.cat([text_targets(bb, [t], args.space, batch_size=1) for t in texts])
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = text_targets(bb, texts, args.space, batch_size=args.batch_size)
    batched_s = time.perf_counter() - t0

    print(json.dumps({
        "benchmark": "text_targets", "backbone": bb.name_or_path, "space": args.space, "n_texts": args.n,
        "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
        "cached_load_s": round(load_s, 3),
        "one_at_a_time_texts_per_s": round(args.n / single_s, 2),
        "batched_texts_per_s": round(args.n / batched_s, 2),
        "batched_over_single": round(single_s / batched_s, 3),
        "max_abs_diff": float((batched - single).abs().max()),
    }))


if __name__ == "__main__":
    main()
