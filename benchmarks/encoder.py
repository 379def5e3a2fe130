"""OPERA-CT encoder throughput at full size on 8-s clips (T = 251): optimised path vs plain reference.

Both paths run the same seeded full-size weights (the fixture weight rule, seed 0) in one process:

* reference: batch 1, ``fused=False`` (literal roll / window partition / softmax attention, F.linear,
  separate GELU), under ``torch.no_grad`` -- what a straightforward port of the public code does;
* optimised: batched, ``fused=True`` (residual stream kept in window order, one gather per block,
  SDPA with a cached bias+mask, oneDNN fused linear+bias(+GELU)), under ``torch.inference_mode``.

Timings alternate between the two paths and keep the best of ``--repeats`` (robust on a shared CPU).
FLOPs per clip are counted with torch.utils.flop_counter on the reference path. ``fraction_of_peak``
is against a large ``torch.mm`` (the BLAS torch uses, MKL in the CPU wheels); because MKL is slow on
some CPUs (AMD) where oneDNN is not, the same GEMM through oneDNN is timed too and
``fraction_of_best_gemm`` is against the faster of the two. Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from respiramfm.models.htsat import HTSAT
from respiramfm.models.htsat_layers import _ONEDNN
from respiramfm.models.opera_ct import HTSAT_PREFIX, from_checkpoint, seeded_state_dict

FRAMES_8S = 251  # 1 + floor(8 * 16000 / 512)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_matmul_gflops(n: int, repeats: int) -> dict:
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = 2 * n**3
    out = {"torch_mm": flops / best_time(lambda: torch.mm(a, b), repeats) / 1e9}
    if _ONEDNN:
        zero = torch.zeros(n)
        bt = b.t().contiguous()
        op = torch.ops.mkldnn._linear_pointwise
        op(a, bt, zero, "none", [], "")
        out["onednn"] = flops / best_time(lambda: op(a, bt, zero, "none", [], ""), repeats) / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = {HTSAT_PREFIX + k: v for k, v in HTSAT().state_dict().items()}
    model = from_checkpoint(seeded_state_dict(shapes, seed=0)).htsat  # frozen, eval
    clips = torch.rand(args.clips, FRAMES_8S, 64, generator=torch.Generator().manual_seed(0))

    def reference() -> torch.Tensor:
        model.fused = False
        with torch.no_grad():
            return torch.cat([model(clips[i : i + 1]) for i in range(len(clips))])

    def optimised() -> torch.Tensor:
        model.fused = True
        with torch.inference_mode():
            return torch.cat([model(clips[i : i + args.batch]) for i in range(0, len(clips), args.batch)])

    model.fused = False
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(clips[:1])
    gflop_per_clip = counter.get_total_flops() / 1e9

    ref_out, opt_out = reference(), optimised()  # warm-up, and the equality check
    max_abs_diff = float((ref_out - opt_out).abs().max())
    t_ref, t_opt = [], []
    for _ in range(args.repeats):
        t_ref.append(best_time(reference, 1))
        t_opt.append(best_time(optimised, 1))
    ref_cps, opt_cps = args.clips / min(t_ref), args.clips / min(t_opt)
    peaks = peak_matmul_gflops(2048, max(args.repeats, 5))
    best_gemm = max(peaks.values())
    achieved = gflop_per_clip * opt_cps
    print(json.dumps({
        "benchmark": "opera_ct_encoder", "clip_seconds": 8, "frames": FRAMES_8S, "clips": args.clips,
        "batch": args.batch, "threads": torch.get_num_threads(), "onednn_linear": _ONEDNN,
        "reference_clips_per_s": round(ref_cps, 3), "optimised_clips_per_s": round(opt_cps, 3),
        "speedup": round(opt_cps / ref_cps, 3),
        "reference_ms_per_clip": round(1e3 / ref_cps, 1), "optimised_ms_per_clip": round(1e3 / opt_cps, 1),
        "gflop_per_clip": round(gflop_per_clip, 3), "achieved_gflops": round(achieved, 1),
        "reference_gflops": round(gflop_per_clip * ref_cps, 1),
        "peak_matmul_gflops": round(peaks["torch_mm"], 1), "peak_onednn_gflops": round(peaks.get("onednn", 0.0), 1),
        "fraction_of_peak": round(achieved / peaks["torch_mm"], 3),
        "fraction_of_best_gemm": round(achieved / best_gemm, 3), "max_abs_diff": max_abs_diff,
        "targets": {"speedup": 1.4, "fraction_of_peak": 0.8, "max_abs_diff": 1e-4},
    }))


if __name__ == "__main__":
    main()
