"""OPERA front end throughput: batched respiramfm path vs per-file librosa, same files, one run.

Both sides start from the file on disk and end with the (T, 64) normalised log-mel,
so decoding and resampling (soundfile + soxr 'HQ') are in both timings, done the
same way.  The reference is the straightforward per-file librosa pipeline OPERA
runs (librosa.load, effects.trim, repeat-pad, feature.melspectrogram,
power_to_db, min-max).  The respiramfm side is ``opera_spectrogram_files``:
decode once per file on a thread pool, then trim/pad in numpy and a length-sorted
batched float64 STFT/mel/dB on torch.

Inputs: the real ICBHI + KAUH recordings in ../shared/data (relative to the repo
root, found from this script's path); synthetic wav files when that is absent.
Each side is warmed up once (librosa's lazy imports, torch's first call) and
timed ``--repeats`` times; the best time counts.  The JSON line also reports the
decode-only and spectrogram-only rates, so the decode share is visible.

    python benchmarks/frontend.py [--device cpu|cuda] [--repeats 3] [--workers N] [--threads N]

``--threads 1 --workers 1`` gives a one-core comparison (useful on a busy machine,
where OpenMP threads of a shared CPU mostly wait for each other).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from respiramfm.audio import FrontendConfig, load, opera_spectrogram_batch, opera_spectrogram_files  # noqa: E402

SR, INPUT_SEC = 16000, 8.0


def real_files() -> list[Path]:
    data = ROOT.parent / "shared" / "data"
    files = sorted((data / "icbhi" / "audio_and_txt_files").glob("*.wav"))
    files += sorted((data / "kauh" / "AudioFiles").glob("*.wav"))
    return files


def synthetic_files(folder: Path, n: int = 40) -> list[Path]:
    """Breath-like noise bursts at 44.1 kHz and 4 kHz, 5-30 s, 16-bit, with quiet edges to trim."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        sr = 44100 if i % 4 == 0 else 4000
        dur = float(rng.uniform(5, 30))
        t = np.arange(int(dur * sr)) / sr
        env = 0.5 * (1 + np.sin(2 * np.pi * 0.25 * t)) ** 2
        y = 0.2 * env * rng.standard_normal(len(t))
        y[: sr // 2] *= 1e-4
        path = folder / f"synthetic_{i:02d}.wav"
        sf.write(path, y.astype(np.float32), sr, subtype="PCM_16")
        out.append(path)
    return out


def librosa_reference(path: Path) -> np.ndarray:
    """OPERA's get_entire_signal_librosa(..., input_sec=8, pad=True, spectrogram=True), per file."""
    y, _ = librosa.load(path, sr=SR)
    return librosa_reference_wave(y)


def librosa_reference_wave(y: np.ndarray) -> np.ndarray:
    """The same pipeline after decoding: trim, repeat-pad, mel, dB, min-max."""
    yt, _ = librosa.effects.trim(y, frame_length=1600, hop_length=800)
    if len(yt) / SR < INPUT_SEC:
        m = int(INPUT_SEC * SR)
        reps = np.tile(yt, -(-m // len(yt)) + 1)
        yt = np.concatenate([reps[len(reps) - (m - len(yt)) :], yt])
    s = librosa.feature.melspectrogram(y=yt, sr=SR, n_mels=64, fmin=50, fmax=8000, n_fft=1024, hop_length=512)
    s = librosa.power_to_db(s, ref=np.max)
    s = (s - s.min()) / (s.max() - s.min()) if s.max() != s.min() else np.zeros_like(s)
    return s.T.astype(np.float32)


def best_time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="decode threads (default: min(8, cores))")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own default; 1 = per-core comparison)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        files = real_files()
        source = "shared/data (ICBHI + KAUH)"
        if not files:
            files, source = synthetic_files(Path(tmp)), "synthetic"
        cfg = FrontendConfig(input_sec=INPUT_SEC)

        def ours():
            return opera_spectrogram_files(files, cfg, device=args.device, workers=args.workers)

        def reference():
            return [librosa_reference(p) for p in files]

        # Warm-up: librosa's lazy submodules and numba, torch's first stft / CUDA context.
        librosa_reference(files[0])
        opera_spectrogram_files(files[:2], cfg, device=args.device)

        t_ours, spec_ours = best_time(ours, args.repeats)
        t_ref, spec_ref = best_time(reference, args.repeats)
        bad = [str(s) for s in spec_ours if not isinstance(s, np.ndarray)]
        if bad:
            raise SystemExit(f"decode failures: {bad}")
        max_diff = max(float(np.abs(a - b).max()) for a, b in zip(spec_ours, spec_ref))

        # Where the time goes: decode+resample alone, and spectrogram alone (pre-decoded).
        t_dec_ours, waves = best_time(lambda: [load(p, SR) for p in files], args.repeats)
        t_dec_ref, _ = best_time(lambda: [librosa.load(p, sr=SR)[0] for p in files], args.repeats)
        t_spec_ours, _ = best_time(lambda: opera_spectrogram_batch(waves, cfg, device=args.device), args.repeats)

        t_spec_ref, _ = best_time(lambda: [librosa_reference_wave(y) for y in waves], args.repeats)

    n = len(files)
    audio_s = sum(len(w) for w in waves) / SR
    print(json.dumps({
        "benchmark": "opera_frontend",
        "files": n,
        "audio_seconds": round(audio_s, 1),
        "source": source,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "respiramfm_files_per_s": round(n / t_ours, 2),
        "librosa_files_per_s": round(n / t_ref, 2),
        "ratio": round(t_ref / t_ours, 2),
        "max_abs_diff": max_diff,
        "decode_only_files_per_s": {
            "respiramfm_serial": round(n / t_dec_ours, 2), "librosa": round(n / t_dec_ref, 2)},
        "spectrogram_only_files_per_s": {
            "respiramfm_batch": round(n / t_spec_ours, 2), "librosa": round(n / t_spec_ref, 2)},
        "decode_share_of_librosa_time": round(t_dec_ref / t_ref, 3),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
