"""A short noisy tone written as PCM16 WAV: the audio of the tiny fake dataset trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tone_wav(path: Path, seconds: float, seed: int, tone: float, sr: int = 4000) -> None:
    """``seconds`` of a ``tone``-Hz sine in seeded white noise at ``sr`` Hz, PCM16, parents created."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    y = 0.05 * rng.standard_normal(t.size) + 0.2 * np.sin(2 * np.pi * tone * t)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, y.astype(np.float32), sr, subtype="PCM_16")
