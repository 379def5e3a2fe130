"""Simulated-cohort generation time against its budgets, one run.

Targets (2 CPU cores): the default cohort (~1,200 recordings) in under 60 s and
``--quick`` (~300 recordings) in under 15 s, so ``make demo`` stays within
minutes. Each size is generated once into a fresh temporary folder (no resume),
and the JSON line puts each measured time next to its budget and their ratio
(below 1 = within budget), plus recordings per second and seconds of audio
written per second of wall time.

    python benchmarks/simulate.py [--seed 0] [--skip-full]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from respiramfm.data.records import read_manifest  # noqa: E402
from respiramfm.data.simulate import SimConfig, simulate_cohort  # noqa: E402

BUDGET_S = {"quick": 15.0, "full": 60.0}


def measure(quick: bool, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="respiramfm-sim-bench-") as tmp:
        t0 = time.perf_counter()
        manifest = simulate_cohort(Path(tmp) / "cohort", SimConfig(seed=seed, quick=quick))
        wall = time.perf_counter() - t0
        recs = read_manifest(manifest)
    audio_s = sum(r.extra["duration_s"] for r in recs)
    return {"s": round(wall, 2), "recordings": len(recs), "rec_per_s": round(len(recs) / wall, 1),
            "audio_s_per_s": round(audio_s / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-full", action="store_true", help="time only the quick cohort")
    args = ap.parse_args()
    out = {"benchmark": "simulate_cohort"}
    for name in ("quick",) if args.skip_full else ("quick", "full"):
        m = measure(name == "quick", args.seed)
        out.update({f"{name}_{k}": v for k, v in m.items()})
        out[f"{name}_budget_s"] = BUDGET_S[name]
        out[f"{name}_ratio_to_budget"] = round(m["s"] / BUDGET_S[name], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
