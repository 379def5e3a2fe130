"""Decode any respiratory recording to a mono float32 waveform, exactly as librosa would.

Why not just call ``librosa.load``?  Three reasons:

* **Uploads.** Browsers record webm/opus, which libsndfile (and so librosa) cannot
  read.  We route by *content* (magic bytes), never by file extension: soundfile for
  the formats libsndfile handles (wav, flac, ogg, mp3, aiff, caf), PyAV (FFmpeg,
  bundled in its wheel) for everything else and as the general fallback.
* **Bad input must fail loudly.** librosa returns whatever libsndfile hands back:
  a truncated wav silently comes back shorter, NaN samples pass through and poison
  every later step.  Here empty, truncated, corrupt, unsupported and non-finite
  input raises :class:`~respiramfm.errors.AudioDecodeError` naming the file and
  the cause, so batch jobs can skip and report the item.
* **Bounded cost.** A few kilobytes of FLAC or WavPack can declare minutes at a
  megahertz sample rate and decode to gigabytes.  Three limits apply to every
  decoder (libsndfile and FFmpeg alike), first to what the header declares and
  then, because headers lie, to what the decoder actually produces, stopping
  as soon as one is crossed:

  - ``max_seconds`` (default :data:`DEFAULT_MAX_SECONDS`) of audio;
  - a native sample rate of at most :data:`MAX_NATIVE_RATE` (384 kHz, the
    highest rate audio hardware records at);
  - a *decoded-samples budget*, counting every channel: ``max_seconds`` x
    :data:`BUDGET_SAMPLES_PER_SECOND` (96,000) unless ``max_samples`` says
    otherwise.  That is the full ``max_seconds`` at 48 kHz stereo or 96 kHz
    mono; 192 kHz or 8 channels get proportionally less time.  Decoding keeps
    at most one block plus the mono result in memory, so the budget bounds the
    memory one decode can take (about 8 bytes per budgeted sample at worst).

Parity: for every file soundfile can read, :func:`load` is bit-identical to
``librosa.load(path, sr=sr)`` (librosa 0.11): soundfile float32 read, mono = mean
of channels in float32, soxr 'HQ' resampling, length fixed to
``ceil(n * sr / sr_native)``.  The OPERA front end's parity depends on this.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import av
import numpy as np
import soundfile as sf
import soxr

from respiramfm.audio.containers import ogg_declared_seconds, shortfall, sniff_format, wav_declared_shortfall
from respiramfm.errors import AudioDecodeError

PathLike = Union[str, os.PathLike]

#: Longest recording :func:`load` accepts by default (10 minutes).  Respiratory
#: recordings in the supported datasets last 1-90 s; an hour of 192 kHz 8-channel
#: audio would need gigabytes, so the limit is a guard, not a modelling choice.
DEFAULT_MAX_SECONDS = 600.0
#: Highest native sample rate accepted (Hz), whatever the duration: 384 kHz is the
#: top rate of studio converters; respiratory datasets use 4-48 kHz.
MAX_NATIVE_RATE = 384_000
#: Decoded samples (all channels) allowed per second of ``max_seconds``.
BUDGET_SAMPLES_PER_SECOND = 96_000

#: Formats that libsndfile decodes (sniffed label -> soundfile is tried first).
_SOUNDFILE_FORMATS = frozenset({"wav", "aiff", "flac", "ogg", "mp3", "caf", "au"})
_UNKNOWN_FRAMES = 1 << 62
_BLOCK_FRAMES = 1 << 18  # decode in blocks: the budget is enforced while decoding, before memory is spent


class _Source:
    """A file on disk or an in-memory upload, opened afresh for each decoder."""

    def __init__(self, name: str, path: Path | None = None, data: bytes | None = None):
        self.name, self.path, self.data = name, path, data

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data) if self.data is not None else open(self.path, "rb")

    def target(self) -> str | BinaryIO:
        """For libsndfile: the path itself (native I/O, no GIL round trips) or a buffer."""
        return io.BytesIO(self.data) if self.data is not None else os.fspath(self.path)

    def size(self) -> int:
        return len(self.data) if self.data is not None else self.path.stat().st_size

    def error(self, message: str) -> AudioDecodeError:
        return AudioDecodeError(message, path=self.name, cause=message)


# ----------------------------------------------------------------------------- checks


def _check_finite(y: np.ndarray, src: _Source, sr: int, offset: int = 0) -> None:
    finite = np.isfinite(y)
    if finite.all():
        return
    if not finite.any():
        raise src.error("every sample is NaN or infinite")
    first = offset + int(np.flatnonzero(~finite.reshape(finite.shape[0], -1).all(axis=1))[0])
    bad = int((~finite).sum())
    raise src.error(f"{bad} of {finite.size} samples are NaN or infinite (first at {first / sr:.3f} s)")


def _check_overflow(y: np.ndarray, src: _Source) -> np.ndarray:
    """Finite samples near the float32 limit (|x| ~ 1e36 and up) can still overflow to inf/NaN
    when channels are averaged or soxr resamples; never hand such a waveform on."""
    if not np.isfinite(y).all():
        raise src.error("sample values too large: mixing channels or resampling overflowed float32 (NaN/inf)")
    return y


class _Limits:
    """The three decode limits (seconds, native rate, decoded-samples budget) for one call."""

    def __init__(self, max_seconds: float | None, max_samples: int | None):
        if max_samples is None and max_seconds is not None:
            max_samples = int(max_seconds * BUDGET_SAMPLES_PER_SECOND)
        self.max_seconds, self.max_samples = max_seconds, max_samples

    def header(self, src: _Source, sr: int, channels: int, frames: int | None) -> None:
        """What the header declares, checked before any sample is decoded."""
        if sr <= 0:
            raise src.error(f"invalid sample rate {sr}")
        if sr > MAX_NATIVE_RATE:
            raise src.error(f"sample rate {sr} Hz is above the maximum of {MAX_NATIVE_RATE} Hz")
        if frames is not None:
            self.progress(src, frames, channels, sr, declared=True)

    def progress(self, src: _Source, frames: int, channels: int, sr: int, declared: bool = False) -> None:
        """``frames`` decoded so far (or declared): stop as soon as a limit is crossed."""
        if self.max_seconds is not None and frames > self.max_seconds * sr:
            raise src.error(f"recording is longer than max_seconds={self.max_seconds:g} s ({frames / sr:.1f} s)")
        samples = frames * max(1, channels)
        if self.max_samples is not None and samples > self.max_samples:
            what = "the header declares" if declared else "decoding stopped after"
            raise src.error(f"over the decoded-samples budget of {self.max_samples} samples: {what} {samples} "
                            f"({frames} frames x {channels} channels at {sr} Hz)")


# ----------------------------------------------------------------------------- decoders


def _to_mono(y: np.ndarray) -> np.ndarray:
    """Mean over channels of a (frames, channels) block, as librosa.to_mono does it."""
    if y.ndim == 1:
        return y
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by _check_overflow
        return np.mean(y.T, axis=0)


def _decode_soundfile(src: _Source, lim: _Limits) -> tuple[np.ndarray, int]:
    with sf.SoundFile(src.target()) as f:
        sr, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
        if frames >= _UNKNOWN_FRAMES:  # libsndfile's "length unknown" (e.g. a streamed FLAC): count while decoding
            frames = 0
        lim.header(src, sr, channels, frames or None)
        # A length the header declared within the budget is allocated once and filled in place.
        out = np.empty(frames, np.float32) if frames and lim.max_samples is not None else None
        blocks, done = [], 0
        while True:  # not f.blocks(): it pads a short last read with stale samples
            block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=channels > 1)
            n = block.shape[0]
            if n == 0:
                break
            lim.progress(src, done + n, channels, sr)
            _check_finite(block, src, sr, offset=done)
            if out is not None and done + n <= frames:
                out[done:done + n] = _to_mono(block)
            else:
                blocks.append(_to_mono(block))
            done += n
    if out is not None:
        y = out[:done] if not blocks else np.concatenate([out[: done - sum(len(b) for b in blocks)], *blocks])
    else:
        y = blocks[0] if len(blocks) == 1 else np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if len(y) < frames:
        raise src.error(f"truncated or corrupt: header declares {frames} frames, only {len(y)} decoded")
    return y, sr


def _decode_pyav(src: _Source, lim: _Limits) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with FFmpeg; planar float32, native rate."""
    # A file object, never the path string: FFmpeg would read "concat:..." or
    # "http://..." in a manifest path as a protocol and open something else.
    with src.open() as fh, av.open(fh, mode="r", metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise src.error("no audio stream in the container")
        stream = container.streams.audio[0]
        declared_s = container.duration / 1e6 if container.duration else None
        cc = stream.codec_context  # None when FFmpeg has no decoder for the codec
        rate, channels = (int(cc.sample_rate or 0), int(cc.channels or 0)) if cc is not None else (0, 0)
        if rate > 0:  # from the stream header, before decoding
            lim.header(src, rate, channels, int(declared_s * rate) if declared_s and declared_s > 0 else None)
        resampler = av.AudioResampler(format="fltp")  # layout and rate unchanged
        chunks: list[np.ndarray] = []
        sr, total = 0, 0

        def take(frame_list):
            nonlocal sr, total
            for fr in frame_list:
                if not sr:
                    sr = int(fr.sample_rate)
                    lim.header(src, sr, len(fr.layout.channels), None)
                block = fr.to_ndarray().T  # (samples, channels)
                lim.progress(src, total + block.shape[0], block.shape[1], sr)
                _check_finite(block, src, sr, offset=total)
                chunks.append(_to_mono(block).astype(np.float32, copy=False))
                total += block.shape[0]

        for frame in container.decode(stream):
            if frame.sample_rate > MAX_NATIVE_RATE:  # a rate change mid-stream
                lim.header(src, int(frame.sample_rate), 1, None)
            take(resampler.resample(frame))
        take(resampler.resample(None))
    if total == 0 or sr <= 0:
        raise src.error("no decodable audio samples (empty or truncated)")
    if shortfall(declared_s, total / sr):
        raise src.error(
            f"truncated or corrupt: container declares {declared_s:.2f} s, only {total / sr:.2f} s decoded"
        )
    return np.concatenate(chunks), sr


_FFMPEG_ERRORS = (av.error.FFmpegError, ValueError, IndexError, EOFError, OSError)


def _decode(src: _Source, lim: _Limits) -> tuple[np.ndarray, int]:
    if src.path is not None and src.path.is_dir():
        raise src.error("is a directory, not an audio file")
    try:
        size = src.size()
        if size == 0:
            raise src.error("empty file (0 bytes)")
        with src.open() as fh:
            kind = sniff_format(fh.read(64))
            short = wav_declared_shortfall(fh, size) if kind == "wav" else None
            ogg_seconds = ogg_declared_seconds(fh, size) if kind == "ogg" else None
    except OSError as exc:
        raise src.error(f"cannot read file ({exc.strerror or exc})") from exc
    if short is not None:
        raise src.error(f"truncated: data chunk declares {short[0]} bytes, file holds {short[1]}")
    sf_cause = None
    if kind in _SOUNDFILE_FORMATS:
        try:
            y, sr = _decode_soundfile(src, lim)
        except sf.SoundFileRuntimeError as exc:
            cause = getattr(exc, "error_string", None) or str(exc)
            if "opening" not in str(exc).lower():
                # Failure while reading samples: the stream is corrupt; FFmpeg would
                # happily return the decodable prefix, which would hide the damage.
                raise src.error(f"corrupt {kind} data ({cause})") from exc
            sf_cause = cause  # libsndfile cannot open it: let FFmpeg try
        else:
            if len(y) == 0:
                raise src.error("no audio samples (zero-length data, or truncated)")
            if shortfall(ogg_seconds, len(y) / sr):
                raise src.error(
                    f"truncated or corrupt: stream declares {ogg_seconds:.2f} s, only {len(y) / sr:.2f} s decoded"
                )
            return y, sr
    try:
        y, sr = _decode_pyav(src, lim)
    except AudioDecodeError:
        raise
    except _FFMPEG_ERRORS as exc:
        label = kind or "unrecognised"
        causes = [f"soundfile: {sf_cause}"] if sf_cause else []
        causes.append(f"FFmpeg: {getattr(exc, 'strerror', None) or exc}")
        raise src.error(f"cannot decode {label} content ({'; '.join(causes)})") from exc
    return y, sr


# ----------------------------------------------------------------------------- public API


def resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """soxr 'HQ' resampling with librosa's length rule (``ceil(n * target / orig)``).

    Bit-identical to ``librosa.resample(y, orig_sr=..., target_sr=...)`` with its
    default ``res_type='soxr_hq'``; returns ``y`` itself when the rates agree.
    """
    if orig_sr == target_sr:
        return y
    n_out = int(np.ceil(y.shape[-1] * (float(target_sr) / orig_sr)))
    out = soxr.resample(y, orig_sr, target_sr, quality="soxr_hq")
    if len(out) > n_out:
        out = out[:n_out]
    elif len(out) < n_out:
        out = np.pad(out, (0, n_out - len(out)))
    return np.asarray(out, dtype=y.dtype)


def _finish(src: _Source, sr: int | None, lim: _Limits) -> np.ndarray:
    if sr is not None and (int(sr) != sr or sr <= 0):
        raise ValueError(f"sr must be a positive integer, got {sr!r}")
    y, native = _decode(src, lim)
    return _check_overflow(y if sr is None else resample(y, native, int(sr)), src)


def decode_native(path: PathLike, *, max_seconds: float | None = DEFAULT_MAX_SECONDS,
                  max_samples: int | None = None) -> tuple[np.ndarray, int]:
    """Decode ``path`` at its own sample rate: ``(mono float32 waveform, rate)``."""
    src = _Source(os.fspath(path), path=Path(path))
    y, sr = _decode(src, _Limits(max_seconds, max_samples))
    return _check_overflow(y, src), sr


def load(path: PathLike, sr: int = 16000, *, max_seconds: float | None = DEFAULT_MAX_SECONDS,
         max_samples: int | None = None) -> np.ndarray:
    """Decode ``path`` to a 1-D float32 mono waveform at ``sr`` Hz.

    Any channel count (mono = mean of channels) and any source rate; soxr 'HQ'
    resampling.  Bit-identical to ``librosa.load(path, sr=sr)[0]`` whenever
    libsndfile can read the file.  ``max_seconds=None`` lifts the length limit
    and, unless ``max_samples`` is given, the decoded-samples budget (default
    ``max_seconds`` x :data:`BUDGET_SAMPLES_PER_SECOND`, all channels counted).

    Raises:
        AudioDecodeError: empty, truncated, corrupt, unsupported, too long, over
            the sample budget or :data:`MAX_NATIVE_RATE`, or containing NaN/inf
            samples (the message names the file and cause).
    """
    return _finish(_Source(os.fspath(path), path=Path(path)), sr, _Limits(max_seconds, max_samples))


def load_audio_bytes(
    data: bytes, name: str, sr: int = 16000, *, max_seconds: float | None = DEFAULT_MAX_SECONDS,
    max_samples: int | None = None,
) -> np.ndarray:
    """Decode an in-memory upload; ``name`` is only used in error messages.

    The format is sniffed from the content, so a webm recording uploaded as
    ``cough.wav`` still decodes.  Same output and errors as :func:`load`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return _finish(_Source(name, data=bytes(data)), sr, _Limits(max_seconds, max_samples))


def load_many(
    paths: Sequence[PathLike],
    sr: int = 16000,
    *,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    workers: int | None = None,
) -> list[np.ndarray | AudioDecodeError]:
    """Decode many files with a thread pool; a bad file yields its error in place.

    libsndfile, FFmpeg and soxr release the GIL, so threads overlap decoding and
    resampling.  Returning errors (instead of raising on the first) lets batch
    jobs skip and report bad items without losing the good ones.
    """
    def one(p: PathLike) -> np.ndarray | AudioDecodeError:
        try:
            return load(p, sr, max_seconds=max_seconds)
        except AudioDecodeError as exc:
            return exc

    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers <= 1 or len(paths) <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


__all__: list[str] = [
    "BUDGET_SAMPLES_PER_SECOND",
    "DEFAULT_MAX_SECONDS",
    "MAX_NATIVE_RATE",
    "decode_native",
    "load",
    "load_audio_bytes",
    "load_many",
    "resample",
]
