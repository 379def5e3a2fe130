"""Log-mel spectrogram of the OPERA front end, steps 5-7 (docs/paper.md §2).

Two implementations of one formula, kept deliberately independent so each checks
the other in the tests:

* :func:`logmel_numpy` -- one clip, numpy float64 (the simple, readable path);
* :func:`logmel_batch` -- many clips of any lengths at once on torch (CPU or GPU),
  the path the embedding pipeline uses.

Formula (librosa 0.11 ``melspectrogram`` + ``power_to_db(ref=max)`` + min-max):
STFT with a periodic Hann window, ``center=True`` and *zero* padding
(``pad_mode="constant"``, librosa's default since 0.10), power ``|X|^2``, Slaney
mel filters (the exact float32 matrix ``librosa.filters.mel`` returns, upcast),
``10 log10(max(amin, S)) - 10 log10(max(amin, max S))`` floored at ``-top_db``,
then ``(S - min) / (max - min)`` per clip, transposed to (T, n_mels).

Why float64: librosa windows in float64 before its FFT.  A float32 FFT carries an
absolute error of ~1e-7 of the frame's loudest bin, which in the quietest bins
(80 dB down) becomes ~4e-4 after min-max -- above the 1e-4 parity budget.

Constant spectrogram (digital silence, or every bin under ``amin``): OPERA skips
the normalisation with a warning, and since dB is relative to the maximum the
result is all zeros.  We return those zeros silently (no NaN, no exception).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import librosa
import numpy as np
import scipy.signal
import torch

AMIN = 1e-10  # power floor of librosa.power_to_db


@lru_cache(maxsize=16)
def mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-scale, Slaney-normalised filters (n_mels, 1 + n_fft // 2) as float64.

    Built by librosa in float32 (its default, the matrix OPERA multiplied by) and
    only then widened, so the weights are exactly OPERA's.
    """
    w = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=False, norm="slaney")
    w = w.astype(np.float64)
    w.setflags(write=False)
    return w


@lru_cache(maxsize=4)
def hann(n_fft: int) -> np.ndarray:
    """The periodic Hann window librosa uses (``scipy.signal.get_window('hann', n, fftbins=True)``)."""
    w = scipy.signal.get_window("hann", n_fft, fftbins=True).astype(np.float64)
    w.setflags(write=False)
    return w


def n_frames(n_samples: int, hop: int) -> int:
    """Frames of a centred STFT: ``1 + n // hop`` (8 s -> 251, 8.18 s -> 256)."""
    return 1 + n_samples // hop


def _db_minmax_numpy(mel: np.ndarray, top_db: float) -> np.ndarray:
    db = 10.0 * np.log10(np.maximum(AMIN, mel)) - 10.0 * np.log10(max(AMIN, float(mel.max())))
    db = np.maximum(db, db.max() - top_db)
    lo, hi = db.min(), db.max()
    if hi > lo:
        return (db - lo) / (hi - lo)
    return np.zeros_like(db)  # constant spectrogram: OPERA's "warning" branch, all zeros


def logmel_numpy(
    y: np.ndarray, sr: int, n_fft: int, hop: int, n_mels: int, fmin: float, fmax: float, top_db: float
) -> np.ndarray:
    """(T, n_mels) float32 normalised log-mel of one already-preprocessed clip."""
    pad = n_fft // 2
    yp = np.pad(np.asarray(y, dtype=np.float64), pad)
    frames = np.lib.stride_tricks.sliding_window_view(yp, n_fft)[::hop]
    spec = np.fft.rfft(frames * hann(n_fft), axis=-1)
    power = spec.real**2 + spec.imag**2
    mel = power @ mel_filters(sr, n_fft, n_mels, fmin, fmax).T  # (T, n_mels)
    return _db_minmax_numpy(mel, top_db).astype(np.float32)


_TORCH_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _torch_consts(sr, n_fft, n_mels, fmin, fmax, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (sr, n_fft, n_mels, fmin, fmax, str(device))
    if key not in _TORCH_CACHE:
        w = torch.from_numpy(mel_filters(sr, n_fft, n_mels, fmin, fmax).copy()).to(device)
        win = torch.from_numpy(hann(n_fft).copy()).to(device)
        _TORCH_CACHE[key] = (w, win)
    return _TORCH_CACHE[key]


def _groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices sorted by length (longest first), cut so each group's padded size fits ``budget``.

    Sorting keeps zero padding small; the budget bounds memory (the float64 complex
    STFT of a group takes about 16 bytes per padded sample).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


#: Windowed-frame elements per STFT block on a CPU (2^17 float64 = 1 MB, cache-sized).
CPU_BLOCK_ELEMENTS = 1 << 17


def _power_mel(x: torch.Tensor, mel_w: torch.Tensor, win: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(B, N) float64 waveforms -> (B, 1 + N // hop, n_mels) mel power of the centred STFT.

    Same as ``torch.stft(center=True, pad_mode="constant")`` followed by ``|X|^2``
    and the filterbank, but computed block by block of frames on a CPU: the whole
    float64 spectrum of a batch falls out of cache, and the memory traffic then
    costs more than the FFT (blocking measured ~1.4x faster on one core than
    ``torch.stft`` on whole clips).  On a GPU one block takes everything.
    """
    frames = torch.nn.functional.pad(x, (n_fft // 2, n_fft // 2)).unfold(-1, n_fft, hop)  # view (B, T, n_fft)
    b, t = frames.shape[:2]
    step = t if x.device.type != "cpu" else max(1, CPU_BLOCK_ELEMENTS // (b * n_fft))
    mel = torch.empty(b, t, mel_w.shape[0], dtype=x.dtype, device=x.device)
    for i in range(0, t, step):
        parts = torch.view_as_real(torch.fft.rfft(frames[:, i : i + step] * win, dim=-1))  # (B, t', F, 2)
        parts.square_()
        # re^2 + im^2 (a reduction over the size-2 axis is much slower than this add)
        mel[:, i : i + step] = torch.matmul(parts[..., 0] + parts[..., 1], mel_w.T)
    return mel


@torch.no_grad()
def _logmel_group(waves: list[np.ndarray], consts, n_fft, hop, top_db, device) -> list[np.ndarray]:
    mel_w, win = consts
    lengths = [len(w) for w in waves]
    buf = np.zeros((len(waves), max(lengths)), dtype=np.float64)
    for row, w in zip(buf, waves):
        row[: len(w)] = w
    # Zero right-padding is harmless: frame t of a clip of n samples only reads
    # samples below t*hop + n_fft/2, i.e. its own samples or its own zero padding.
    mel = _power_mel(torch.from_numpy(buf).to(device), mel_w, win, n_fft, hop)  # (B, Tmax, n_mels)
    t = torch.as_tensor([n_frames(n, hop) for n in lengths], device=device)
    invalid = (torch.arange(mel.shape[1], device=device)[None, :] >= t[:, None])[:, :, None]
    ref = mel.masked_fill(invalid, float("-inf")).amax(dim=(1, 2))
    db = 10.0 * torch.log10(mel.clamp_min(AMIN)) - (10.0 * torch.log10(ref.clamp_min(AMIN)))[:, None, None]
    hi = db.masked_fill(invalid, float("-inf")).amax(dim=(1, 2))
    db = torch.maximum(db, (hi - top_db)[:, None, None])
    lo = db.masked_fill(invalid, float("inf")).amin(dim=(1, 2))
    rng = (hi - lo)[:, None, None]
    out = torch.where(rng > 0, (db - lo[:, None, None]) / torch.where(rng > 0, rng, 1.0), 0.0)
    out = out.to(torch.float32).cpu().numpy()  # (B, Tmax, n_mels)
    return [np.ascontiguousarray(out[i, : n_frames(n, hop)]) for i, n in enumerate(lengths)]


def logmel_batch(
    waves: Sequence[np.ndarray],
    sr: int,
    n_fft: int,
    hop: int,
    n_mels: int,
    fmin: float,
    fmax: float,
    top_db: float,
    device: str | torch.device = "cpu",
    max_batch_samples: int | None = None,
) -> list[np.ndarray]:
    """:func:`logmel_numpy` for many preprocessed clips at once, in input order.

    Clips are grouped by length under ``max_batch_samples`` padded samples per
    group; a clip longer than the budget forms a group of its own.  The default
    depends on the device: on a GPU, big groups (2^24 samples, ~17 minutes of
    16 kHz audio) amortise kernel launches; on a CPU, where the STFT is
    memory-bound and is computed in cache-sized blocks anyway, about one clip per
    group (2^18 samples) was fastest in our measurements on the real clips.
    """
    device = torch.device(device)
    if max_batch_samples is None:
        max_batch_samples = 1 << 18 if device.type == "cpu" else 1 << 24
    consts = _torch_consts(sr, n_fft, n_mels, fmin, fmax, device)
    out: list[np.ndarray | None] = [None] * len(waves)
    for group in _groups([len(w) for w in waves], max_batch_samples):
        specs = _logmel_group([waves[i] for i in group], consts, n_fft, hop, top_db, device)
        for i, s in zip(group, specs):
            out[i] = s
    return out  # type: ignore[return-value]
