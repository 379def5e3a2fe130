"""``logmel-stats``: a cheap, non-learned audio baseline on the OPERA front end.

Why it exists: every learned encoder in this project should beat *something*
that costs nothing to train. This encoder summarises the same (T, 64) OPERA
log-mel spectrogram the learned encoders see with fixed per-mel-bin statistics
over time, so any gain a learned encoder shows is a gain over "which frequency
bands carry energy, how much it varies, and how fast it changes".

Feature layout (``out_dim = 6 * n_mels`` = 384 for the 64-bin front end),
statistic-major, so feature ``s * n_mels + m`` is statistic ``s`` of mel bin ``m``:

====  =========  ==================================================================
 s    name       per mel bin, over the T frames
====  =========  ==================================================================
 0    mean       average level (the long-term spectrum)
 1    std        spread of the level (stationary hum vs intermittent sounds)
 2    p10        10th percentile (the noise floor of that band)
 3    p50        median level
 4    p90        90th percentile (the loud events: crackles, wheezes, coughs)
 5    flux       mean absolute frame-to-frame change (per-bin spectral flux)
====  =========  ==================================================================

Statistics are computed in float64 and returned as float32; the result depends
only on the spectrogram, never on the batch it arrives in, so it is exactly
reproducible across batch sizes, processes and resumed runs.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from respiramfm.errors import AudioDecodeError

STATS: tuple[str, ...] = ("mean", "std", "p10", "p50", "p90", "flux")
_QUANTILES = (10.0, 50.0, 90.0)
_VERSION = 1  # bump whenever the feature definition changes (it is part of the cache key)


def logmel_stats(spec: np.ndarray) -> np.ndarray:
    """(T, n_mels) spectrogram -> (len(STATS) * n_mels,) float32 feature vector.

    A single frame (T == 1) has no frame-to-frame change, so its flux is 0.
    """
    spec = np.asarray(spec)
    if spec.ndim != 2:
        raise ValueError(f"expected a (T, n_mels) spectrogram, got shape {spec.shape}")
    if spec.shape[0] == 0:
        raise AudioDecodeError("empty spectrogram (0 frames)")
    x = spec.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise AudioDecodeError("spectrogram contains non-finite values")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    q10, q50, q90 = np.percentile(x, _QUANTILES, axis=0)
    flux = np.abs(np.diff(x, axis=0)).mean(axis=0) if x.shape[0] > 1 else np.zeros(x.shape[1])
    return np.concatenate([mean, std, q10, q50, q90, flux]).astype(np.float32)


class LogMelStatsEncoder:
    """Encoder object for the registry: ``encode(specs) -> (B, 6 * n_mels)``.

    It has no weights; ``weights_hash`` is a hash of its settings (feature list,
    quantiles, mel count and a version number) so the embedding cache tells
    different definitions apart.
    """

    name = "logmel-stats"

    def __init__(self, n_mels: int = 64):
        if n_mels <= 0:
            raise ValueError(f"n_mels must be positive, got {n_mels}")
        self.n_mels = int(n_mels)
        self.out_dim = len(STATS) * self.n_mels
        settings = {"encoder": self.name, "version": _VERSION, "stats": list(STATS),
                    "quantiles": list(_QUANTILES), "n_mels": self.n_mels}
        self.weights_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def encode(self, specs: list[np.ndarray]) -> np.ndarray:
        out = np.empty((len(specs), self.out_dim), dtype=np.float32)
        for i, spec in enumerate(specs):
            if np.ndim(spec) != 2 or np.shape(spec)[1] != self.n_mels:
                raise ValueError(f"spectrogram {i} has shape {np.shape(spec)}, expected (T, {self.n_mels})")
            out[i] = logmel_stats(spec)
        return out

    def feature_names(self) -> list[str]:
        """Human-readable name of every output dimension, e.g. ``'p90[12]'``."""
        return [f"{s}[{m}]" for s in STATS for m in range(self.n_mels)]
