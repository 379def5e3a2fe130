"""Does bf16 pay on this CPU? fp32 vs bf16 matrix products and an autocast linear layer, side by side.

A stage-2-sized product (``--rows`` x 576 by 576 x 576, SmolLM2's width) in fp32 and in bf16, and a
``Linear(576, 576)`` under bf16 autocast against fp32, alternating rounds, best of each; then the
decision ``precision: auto`` takes here (:func:`respiramfm.training.engine.bf16_pays`). On CPUs with
native bf16 dot products (AVX512-BF16, AMX) bf16 is faster; on an AVX2-only CPU torch uses a
reference bf16 GEMM that is many times slower. One JSON line.

    python benchmarks/bf16_gemm.py [--rows 256] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from respiramfm.training.engine import bf16_pays  # noqa: E402


def seconds(fn, reps: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    a, b = torch.randn(args.rows, 576), torch.randn(576, 576)
    ab, bb = a.bfloat16(), b.bfloat16()
    lin = torch.nn.Linear(576, 576)

    def autocast_linear():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lin(a)

    def plain_linear():
        with torch.no_grad():
            lin(a)

    arms = {"mm_fp32": lambda: a @ b, "mm_bf16": lambda: ab @ bb, "linear_fp32": plain_linear,
            "linear_bf16_autocast": autocast_linear}
    best = {k: float("inf") for k in arms}
    for _ in range(args.rounds):
        for k, fn in arms.items():
            best[k] = min(best[k], seconds(fn))
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    print(json.dumps({"benchmark": "bf16_gemm", "rows": args.rows, "threads": args.threads,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
                      "ms": {k: round(v * 1000, 3) for k, v in best.items()},
                      "bf16_over_fp32_mm": round(best["mm_bf16"] / best["mm_fp32"], 2),
                      "bf16_over_fp32_linear": round(best["linear_bf16_autocast"] / best["linear_fp32"], 2),
                      "auto_picks": "bf16" if bf16_pays("cpu") else "fp32"}))


if __name__ == "__main__":
    main()
