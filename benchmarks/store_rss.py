"""Peak memory of ``respiramfm embed`` for a small vs a large manifest of synthetic clips.

The store streams: one batch of audio and spectrograms per process, and the
final array is assembled shard by shard through a memory map. So peak RSS should
not grow with the number of clips. Each size runs in a fresh child process that
first imports everything and embeds one warm-up clip (baseline), then embeds the
manifest; we report the peak, the peak above the baseline, throughput, and the
large/small ratios. Prints ONE JSON line.

    python benchmarks/store_rss.py                     # N = 100 vs N = 1000
    python benchmarks/store_rss.py --small 20 --large 200 --workdir scratch/rss
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SR = 16000


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_clips(directory: Path, n: int, seconds: float) -> list[Path]:
    """``n`` distinct, deterministic clips (noise plus a tone of clip-specific pitch), 16-bit wav."""
    import numpy as np
    import soundfile as sf

    directory.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * SR)) / SR
    paths = []
    for i in range(n):
        p = directory / f"clip{i:05d}.wav"
        if not p.exists():
            rng = np.random.default_rng(i)
            y = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (150 + 7 * i) * t)
            sf.write(p, y.astype(np.float32), SR, subtype="PCM_16")
        paths.append(p)
    return paths


def make_manifest(path: Path, clips: list[Path]) -> Path:
    from respiramfm.data.records import Record, write_manifest

    recs = [Record(record_id=f"c{i:05d}", patient_id=f"p{i}", dataset="synthetic", audio_path=str(c))
            for i, c in enumerate(clips)]
    return write_manifest(recs, path)


def child(manifest: str, warmup: str, out: str, encoder: str, batch_size: int) -> None:
    from respiramfm.encoders.store import embed_manifest

    embed_manifest(warmup, Path(out) / "warmup", encoder, batch_size=batch_size, progress=False)
    baseline = _rss_mb()
    t0 = time.perf_counter()
    meta = embed_manifest(manifest, Path(out) / "store", encoder, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({"baseline_mb": baseline, "peak_mb": _rss_mb(), "seconds": seconds,
                      "embedded": meta["counts"]["embedded"]}))


def measure(workdir: Path, n: int, seconds: float, encoder: str, batch_size: int) -> dict:
    clips = make_clips(workdir / "clips", n, seconds)
    manifest = make_manifest(workdir / f"manifest_{n}.csv", clips)
    warmup = make_manifest(workdir / f"warmup_{n}.csv", make_clips(workdir / f"warm{n}", 1, seconds))
    res = subprocess.run([sys.executable, __file__, "--child", str(manifest), str(warmup), str(workdir / f"out_{n}"),
                          "--encoder", encoder, "--batch-size", str(batch_size)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"child for n={n} failed:\n{res.stderr[-3000:]}")
    report = json.loads(res.stdout.strip().splitlines()[-1])
    if report["embedded"] != n:
        raise SystemExit(f"child for n={n} embedded {report['embedded']} clips")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--large", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each synthetic clip")
    ap.add_argument("--encoder", default="logmel-stats")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workdir", default=None, help="where clips and stores go (default: a temporary directory)")
    ap.add_argument("--child", nargs=3, metavar=("MANIFEST", "WARMUP", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child, encoder=args.encoder, batch_size=args.batch_size)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        small = measure(workdir, args.small, args.seconds, args.encoder, args.batch_size)
        large = measure(workdir, args.large, args.seconds, args.encoder, args.batch_size)
    d_small = small["peak_mb"] - small["baseline_mb"]
    d_large = large["peak_mb"] - large["baseline_mb"]
    print(json.dumps({
        "benchmark": "store_rss", "encoder": args.encoder, "clip_seconds": args.seconds,
        "batch_size": args.batch_size, "n_small": args.small, "n_large": args.large,
        "peak_rss_mb_small": round(small["peak_mb"], 1), "peak_rss_mb_large": round(large["peak_mb"], 1),
        "peak_ratio": round(large["peak_mb"] / small["peak_mb"], 4),
        "above_baseline_mb_small": round(d_small, 1), "above_baseline_mb_large": round(d_large, 1),
        "above_baseline_growth_mb": round(d_large - d_small, 1),
        "clips_per_s_small": round(args.small / small["seconds"], 1),
        "clips_per_s_large": round(args.large / large["seconds"], 1),
    }))


if __name__ == "__main__":
    main()
