"""The OPERA-CT front end, exactly (docs/paper.md §2): waveform -> (T, 64) log-mel.

OPERA (``evelyn0414/OPERA:src/util.py``, ``get_entire_signal_librosa``) turns a
16 kHz recording into the encoder's input in four steps:

1. **trim** leading/trailing frames more than 60 dB below the loudest frame
   (``librosa.effects.trim``, frame 1600 = 100 ms, hop 800, centred RMS frames);
2. **repeat-pad** a clip shorter than ``input_sec`` to ``M = int(input_sec * sr)``
   samples with ``out[n] = x[(n - left) mod L]``, ``left = M - L``: the original
   clip sits at the *end*, preceded by the periodic tail of the repeated clip
   (OPERA reaches this branch through ``random.seed(7456)``, which always draws
   0.0618 < 0.5; we simply take that branch, without touching any global RNG);
3. **crop** -- OPERA itself keeps a long clip whole (``crop="whole"``); two
   published variants cut a ``crop_sec = 8.18`` s window (256 frames):
   ``"first"``, the first chunk (RespLLM, via ``get_split_signal_librosa``), and
   ``"peak"``, the window centred on the loudest sample (official RespiraMFM
   ``get_entire_signal_librosa_trimmed``; note that despite its name that
   function does *not* trim, so ``trim=False`` reproduces it exactly);
   both pad short clips to ``crop_sec`` instead of ``input_sec``;
4. **log-mel** (:mod:`respiramfm.audio.melspec`) normalised to [0, 1] per clip.

``T = 1 + N // 512`` for the N samples after step 3 (8 s -> 251 frames).
A zero-length clip raises :class:`AudioDecodeError` (OPERA's padding loop never
ends on one); digital silence yields an all-zero spectrogram.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from respiramfm.audio import melspec
from respiramfm.audio.decode import DEFAULT_MAX_SECONDS, MAX_NATIVE_RATE, load_many, resample
from respiramfm.errors import AudioDecodeError, ConfigError

CROPS = ("whole", "first", "peak")
# Upper bounds (far above any real setting) so a mistyped or tampered config cannot allocate
# gigabytes before the first check: e.g. n_fft = 10**9 would need a 119 GiB STFT window.
LIMITS = {"sr": MAX_NATIVE_RATE, "n_mels": 1024, "n_fft": 65536, "hop": 65536, "trim_frame": 1 << 20,
          "trim_hop": 1 << 20, "input_sec": 3600.0, "crop_sec": 3600.0}


@dataclass(frozen=True)
class FrontendConfig:
    """Every knob of the OPERA front end; the defaults are OPERA-CT's (docs/paper.md §2).

    ``crop_sec`` only matters for ``crop="first"``/``"peak"``; the ``trim_*``
    fields only when ``trim`` is on.  :meth:`key` names the configuration for
    embedding caches.
    """

    sr: int = 16000
    input_sec: float = 8.0
    crop: str = "whole"
    crop_sec: float = 8.18
    n_mels: int = 64
    n_fft: int = 1024
    hop: int = 512
    fmin: float = 50.0
    fmax: float = 8000.0
    top_db: float = 80.0
    trim: bool = True
    trim_top_db: float = 60.0
    trim_frame: int = 1600
    trim_hop: int = 800

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ConfigError(f"frontend.crop must be one of {CROPS}, got {self.crop!r}")
        for name in ("sr", "n_mels", "n_fft", "hop", "trim_frame", "trim_hop"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ConfigError(f"frontend.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("input_sec", "crop_sec", "top_db", "trim_top_db"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"frontend.{name} must be positive, got {getattr(self, name)!r}")
        for name, limit in LIMITS.items():
            if getattr(self, name) > limit:
                raise ConfigError(f"frontend.{name} is {getattr(self, name)!r}, above the limit of {limit}")
        if not 0 <= self.fmin < self.fmax <= self.sr / 2:
            raise ConfigError(f"frontend: need 0 <= fmin < fmax <= sr/2, got {self.fmin}, {self.fmax}")

    def key(self) -> str:
        """Stable, filesystem-safe name of the features this config produces.

        Fields that cannot change the output (``crop_sec`` for ``"whole"``, the
        ``trim_*`` values when trimming is off) are left out, so equivalent
        configs share a cache.
        """
        crop = self.crop if self.crop == "whole" else f"{self.crop}{self.crop_sec:g}"
        trim = f"trim{self.trim_top_db:g}-{self.trim_frame}-{self.trim_hop}" if self.trim else "notrim"
        return (
            f"opera-fe1_sr{self.sr}_in{self.input_sec:g}_{crop}_mel{self.n_mels}"
            f"_fft{self.n_fft}_hop{self.hop}_f{self.fmin:g}-{self.fmax:g}_db{self.top_db:g}_{trim}"
        )

    def replace(self, **changes) -> "FrontendConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- waveform steps


def _as_wave(wave: np.ndarray, what: str = "waveform") -> np.ndarray:
    y = np.asarray(wave)
    if y.ndim != 1:
        raise AudioDecodeError(f"{what} must be 1-D (mono), got shape {y.shape}")
    if y.size == 0:
        raise AudioDecodeError(f"{what} is empty (0 samples)")
    if not np.issubdtype(y.dtype, np.floating):
        raise AudioDecodeError(f"{what} must be floating point, got {y.dtype}")
    if not np.isfinite(y).all():
        raise AudioDecodeError(f"{what} contains NaN or infinite samples")
    return y.astype(np.float32, copy=False)  # OPERA works on librosa's float32 samples


def _frame_energies(y: np.ndarray, frame: int, hop: int) -> np.ndarray:
    """Sum of squares of each centred (zero-padded by frame // 2) frame of ``y``."""
    pad = frame // 2
    count = 1 + (len(y) + 2 * pad - frame) // hop
    if pad % hop or frame % hop:  # general case: strided frames of the padded signal
        yp = np.pad(y, pad)
        frames = np.lib.stride_tricks.sliding_window_view(yp, frame)[::hop][:count]
        return np.einsum("ij,ij->i", frames, frames)
    # Frames made of whole hops (OPERA: frame = 2 hops, pad = 1 hop): sum per-hop
    # block energies, without materialising a padded copy of the signal.
    full = len(y) // hop * hop
    blocks = np.zeros(pad // hop + count + frame // hop)
    body = y[:full].reshape(-1, hop)
    blocks[pad // hop : pad // hop + len(body)] = np.einsum("ij,ij->i", body, body)
    blocks[pad // hop + len(body)] = y[full:] @ y[full:]
    return sum(blocks[i : i + count] for i in range(frame // hop))


def trim_bounds(
    y: np.ndarray, top_db: float = 60.0, frame_length: int = 1600, hop_length: int = 800
) -> tuple[int, int]:
    """``[start, end)`` that ``librosa.effects.trim(y, top_db, frame_length, hop_length)`` keeps.

    RMS of centred, zero-padded frames; a frame is kept when
    ``10 log10(max(1e-10, rms^2)) - 10 log10(max(1e-10, max rms^2)) > -top_db``;
    the interval runs from the first kept frame's start to the end of the last
    kept frame (clipped to the signal).  Energies are summed in float64 (librosa
    uses float32), which can only matter for a frame within ~1e-6 dB of the
    threshold.  A signal whose every frame is under the floor keeps everything.
    """
    energy = _frame_energies(np.asarray(y, dtype=np.float64), frame_length, hop_length)
    power = energy / frame_length
    db = 10.0 * np.log10(np.maximum(1e-10, power)) - 10.0 * np.log10(max(1e-10, float(power.max())))
    kept = np.flatnonzero(db > -top_db)
    if kept.size == 0:
        return 0, 0
    return int(kept[0]) * hop_length, min(len(y), (int(kept[-1]) + 1) * hop_length)


def repeat_pad(y: np.ndarray, length: int) -> np.ndarray:
    """OPERA's ``_duplicate_padding`` (back branch): ``out[n] = y[(n - left) mod L]``, ``left = length - L``.

    The clip ends the output; a clip already ``length`` long (or longer) is returned unchanged.
    """
    left = length - len(y)
    if left <= 0:
        return y
    return y[(np.arange(length) - left) % len(y)]


def peak_window(y: np.ndarray, length: int) -> np.ndarray:
    """``length`` samples centred on the loudest sample, shifted to stay inside the clip.

    Equals official RespiraMFM ``crop_window_around_peak`` (for an even ``length``):
    start = clip(peak - length // 2, 0, len - length); shorter clips pass whole.
    """
    if len(y) <= length:
        return y
    start = min(max(int(np.argmax(np.abs(y))) - length // 2, 0), len(y) - length)
    return y[start : start + length]


def preprocess_wave(wave: np.ndarray, cfg: FrontendConfig | None = None) -> np.ndarray:
    """Steps 1-3 on a waveform already at ``cfg.sr``: trim, crop policy, repeat-pad (float32).

    ``"whole"``: pad to ``int(input_sec * sr)`` samples if shorter than
    ``input_sec``, otherwise keep the whole clip.  ``"first"``/``"peak"``: cut a
    ``crop_sec`` window (first samples / centred on the peak) and pad a shorter
    clip to ``int(crop_sec * sr)`` -- exactly 256 frames at 8.18 s.

    Raises:
        AudioDecodeError: empty, non-1-D, non-float or non-finite input.
    """
    cfg = cfg or FrontendConfig()
    y = _as_wave(wave)
    if cfg.trim:
        start, end = trim_bounds(y, cfg.trim_top_db, cfg.trim_frame, cfg.trim_hop)
        if end <= start:  # impossible with frame = 2 hops; guards exotic trim framings
            raise AudioDecodeError(f"nothing left after trimming {len(y)} samples")
        y = y[start:end]
    if cfg.crop == "whole":
        # Same test and target length as OPERA (duration in seconds vs input_sec).
        if len(y) / cfg.sr < cfg.input_sec:
            y = repeat_pad(y, int(cfg.input_sec * cfg.sr))
        return y
    length = int(cfg.crop_sec * cfg.sr)
    y = y[:length] if cfg.crop == "first" else peak_window(y, length)
    if len(y) / cfg.sr < cfg.crop_sec:
        y = repeat_pad(y, length)
    return y


# ----------------------------------------------------------------------------- spectrograms


def _mel_args(cfg: FrontendConfig) -> tuple:
    return (cfg.sr, cfg.n_fft, cfg.hop, cfg.n_mels, cfg.fmin, cfg.fmax, cfg.top_db)


def opera_spectrogram(
    wave: np.ndarray,
    sr: int = 16000,
    input_sec: float = 8.0,
    crop: str = "whole",
    cfg: FrontendConfig | None = None,
) -> np.ndarray:
    """One clip -> (T, n_mels) float32 in [0, 1], OPERA's ``get_entire_signal_librosa``.

    ``sr`` is the rate of ``wave``; other rates are resampled with soxr 'HQ' (as
    librosa.load would).  Without ``cfg``, ``FrontendConfig(input_sec=..., crop=...)``
    is used; with ``cfg``, ``input_sec`` and ``crop`` must stay at their defaults.
    Computed in numpy float64, independently of the batched torch path.
    Silence gives all zeros (see :mod:`respiramfm.audio.melspec`).
    """
    if cfg is None:
        cfg = FrontendConfig(input_sec=input_sec, crop=crop)
    elif (input_sec, crop) != (8.0, "whole"):
        raise ConfigError("pass input_sec/crop either as arguments or inside cfg, not both")
    y = _as_wave(wave)
    if sr != cfg.sr:
        y = resample(y, sr, cfg.sr)
    return melspec.logmel_numpy(preprocess_wave(y, cfg), *_mel_args(cfg))


def opera_spectrogram_batch(
    waves: Sequence[np.ndarray],
    cfg: FrontendConfig | None = None,
    device: str = "cpu",
    max_batch_samples: int | None = None,
) -> list[np.ndarray]:
    """Many clips (at ``cfg.sr``, any lengths) -> list of (T_i, n_mels) float32, in order.

    The main path: trim/pad/crop per clip in numpy, then STFT, mel and dB for
    length-sorted groups on torch (``device`` "cpu", "cuda", ...) in float64;
    ``max_batch_samples`` bounds a group's padded size (default: per device,
    see :func:`respiramfm.audio.melspec.logmel_batch`).
    Matches :func:`opera_spectrogram` to float rounding.  Raises
    :class:`AudioDecodeError` for the first invalid clip (use
    :func:`opera_spectrogram_files` for skip-and-report over files).
    """
    cfg = cfg or FrontendConfig()
    ready = []
    for i, w in enumerate(waves):
        try:
            ready.append(preprocess_wave(w, cfg))
        except AudioDecodeError as exc:
            raise AudioDecodeError(f"clip {i}: {exc}") from exc
    return melspec.logmel_batch(ready, *_mel_args(cfg), device=device, max_batch_samples=max_batch_samples)


def opera_spectrogram_files(
    paths: Sequence[str | os.PathLike],
    cfg: FrontendConfig | None = None,
    device: str = "cpu",
    workers: int | None = None,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    content_check: Callable[[np.ndarray], object] | None = None,
) -> list[np.ndarray | AudioDecodeError]:
    """Decode (thread pool) and featurise files; a bad file yields its error in place.

    Each file is decoded and resampled once (:func:`respiramfm.audio.load_many`),
    then all good clips go through :func:`opera_spectrogram_batch` together.
    ``content_check`` (e.g. :func:`respiramfm.audio.content.check_content` at
    ``cfg.sr``) sees each decoded waveform first; the error it raises is that file's.
    """
    cfg = cfg or FrontendConfig()
    decoded = load_many(paths, cfg.sr, max_seconds=max_seconds, workers=workers)
    out: list[np.ndarray | AudioDecodeError] = list(decoded)
    good: list[int] = []
    waves: list[np.ndarray] = []
    for i, (p, y) in enumerate(zip(paths, decoded)):
        if isinstance(y, AudioDecodeError):
            continue
        try:
            if content_check is not None:
                content_check(y)
            waves.append(preprocess_wave(y, cfg))
            good.append(i)
        except AudioDecodeError as exc:
            out[i] = type(exc)(exc.cause, path=p)
    specs = melspec.logmel_batch(waves, *_mel_args(cfg), device=device)
    for i, s in zip(good, specs):
        out[i] = s
    return out
