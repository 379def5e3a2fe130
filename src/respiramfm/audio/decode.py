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
* **Bounded cost.** ``max_seconds`` (default :data:`DEFAULT_MAX_SECONDS`) rejects
  absurdly long files before decoding them (checked from the header where it
  declares a length, during decoding otherwise).

Parity: for every file soundfile can read, :func:`load` is bit-identical to
``librosa.load(path, sr=sr)`` (librosa 0.11): soundfile float32 read, mono = mean
of channels in float32, soxr 'HQ' resampling, length fixed to
``ceil(n * sr / sr_native)``.  The OPERA front end's parity depends on this.
"""

from __future__ import annotations

import io
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import av
import numpy as np
import soundfile as sf
import soxr

from respiramfm.errors import AudioDecodeError

PathLike = Union[str, os.PathLike]

#: Longest recording :func:`load` accepts by default (10 minutes).  Respiratory
#: recordings in the supported datasets last 1-90 s; an hour of 192 kHz 8-channel
#: audio would need gigabytes, so the limit is a guard, not a modelling choice.
DEFAULT_MAX_SECONDS = 600.0

#: Formats that libsndfile decodes (sniffed label -> soundfile is tried first).
_SOUNDFILE_FORMATS = frozenset({"wav", "aiff", "flac", "ogg", "mp3", "caf", "au"})
_BLOCK_FRAMES = 1 << 20  # decode multichannel files in blocks to bound memory


def sniff_format(head: bytes) -> str | None:
    """Name the container from its first bytes (at least 12), or ``None`` if unknown.

    Labels: wav, aiff, flac, ogg, mp3, caf, au, webm (any Matroska), mp4, aac.
    The extension of a file is never consulted: users rename files freely.
    """
    if len(head) < 4:
        return None
    if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"caff":
        return "caf"
    if head[:4] == b".snd":
        return "au"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "webm"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:3] == b"ID3":
        return "mp3"
    if head[0] == 0xFF and (head[1] & 0xF6) == 0xF0:  # ADTS sync, layer bits 00
        return "aac"
    if head[0] == 0xFF and (head[1] & 0xE0) == 0xE0:  # MPEG audio frame sync
        return "mp3"
    return None


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


def _wav_declared_shortfall(fh: BinaryIO, size: int) -> tuple[int, int] | None:
    """For a RIFF/WAVE stream, return (declared, available) data bytes when truncated.

    libsndfile silently shrinks a data chunk that runs past the end of the file,
    so truncation is invisible after decoding; the RIFF chunk table still tells.
    Streaming writers that leave the size unset (0 or 0xFFFFFFFF) are not flagged.
    """
    fh.seek(0)
    head = fh.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None  # RIFX / RF64: libsndfile's own checks only
    pos = 12
    while pos + 8 <= size:
        fh.seek(pos)
        chunk_id, chunk_size = struct.unpack("<4sI", fh.read(8))
        if chunk_id == b"data":
            available = size - (pos + 8)
            if chunk_size not in (0, 0xFFFFFFFF) and chunk_size > available:
                return chunk_size, available
            return None
        pos += 8 + chunk_size + (chunk_size & 1)
    return None


def _ogg_declared_seconds(fh: BinaryIO, size: int) -> float | None:
    """Duration an Ogg stream declares: the last page's granule position.

    libsndfile stops quietly at a damaged Ogg page and reports only what it read,
    so, as for wav, the container's own bookkeeping is the witness.  Handles
    Vorbis/FLAC (granule = samples at the stream rate) and Opus (48 kHz granule
    minus pre-skip); anything else returns ``None`` (not checked).
    """
    fh.seek(0)
    first = fh.read(27 + 255 + 64)
    if len(first) < 28:
        return None
    body = first[27 + first[26] :]
    if body[:7] == b"\x01vorbis" and len(body) >= 16:
        rate, preskip = struct.unpack("<I", body[12:16])[0], 0
    elif body[:8] == b"OpusHead" and len(body) >= 12:
        rate, preskip = 48000, struct.unpack("<H", body[10:12])[0]
    elif body[:5] == b"\x7fFLAC" and len(body) >= 30:
        rate, preskip = int.from_bytes(body[27:30], "big") >> 4, 0
    else:
        return None
    fh.seek(max(0, size - 65536))
    tail = fh.read()
    last = tail.rfind(b"OggS")
    if last < 0 or last + 14 > len(tail) or rate <= 0:
        return None
    granule = struct.unpack("<q", tail[last + 6 : last + 14])[0]
    return None if granule < 0 else max(0, granule - preskip) / rate


def _shortfall(declared_s: float | None, decoded_s: float) -> bool:
    """Decoded clearly less than declared (codec priming/padding stays within tolerance)."""
    return declared_s is not None and declared_s - decoded_s > max(0.25, 0.05 * declared_s)


def _check_finite(y: np.ndarray, src: _Source, sr: int) -> None:
    finite = np.isfinite(y)
    if finite.all():
        return
    if not finite.any():
        raise src.error("every sample is NaN or infinite")
    first = int(np.flatnonzero(~finite.reshape(finite.shape[0], -1).all(axis=1))[0])
    bad = int((~finite).sum())
    raise src.error(f"{bad} of {finite.size} samples are NaN or infinite (first at {first / sr:.3f} s)")


def _check_overflow(y: np.ndarray, src: _Source) -> np.ndarray:
    """Finite samples near the float32 limit (|x| ~ 1e36 and up) can still overflow to inf/NaN
    when channels are averaged or soxr resamples; never hand such a waveform on."""
    if not np.isfinite(y).all():
        raise src.error("sample values too large: mixing channels or resampling overflowed float32 (NaN/inf)")
    return y


def _check_length(frames: int, sr: int, src: _Source, max_seconds: float | None) -> None:
    if max_seconds is not None and frames > max_seconds * sr:
        raise src.error(f"recording is longer than max_seconds={max_seconds:g} s ({frames / sr:.1f} s)")


# ----------------------------------------------------------------------------- decoders


def _to_mono(y: np.ndarray) -> np.ndarray:
    """Mean over channels of a (frames, channels) block, as librosa.to_mono does it."""
    if y.ndim == 1:
        return y
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by _check_overflow
        return np.mean(y.T, axis=0)


def _decode_soundfile(src: _Source, max_seconds: float | None) -> tuple[np.ndarray, int]:
    with sf.SoundFile(src.target()) as f:
        sr, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
        if sr <= 0:
            raise src.error(f"invalid sample rate {sr}")
        _check_length(frames, sr, src, max_seconds)
        if channels == 1:
            y = f.read(dtype="float32", always_2d=False)
            _check_finite(y, src, sr)
        else:
            blocks = []
            for block in f.blocks(blocksize=_BLOCK_FRAMES, dtype="float32", always_2d=True):
                _check_finite(block, src, sr)
                blocks.append(_to_mono(block))
            y = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if len(y) < frames:
        raise src.error(f"truncated or corrupt: header declares {frames} frames, only {len(y)} decoded")
    return y, sr


def _decode_pyav(src: _Source, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with FFmpeg; planar float32, native rate."""
    # A file object, never the path string: FFmpeg would read "concat:..." or
    # "http://..." in a manifest path as a protocol and open something else.
    with src.open() as fh, av.open(fh, mode="r", metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise src.error("no audio stream in the container")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp")  # layout and rate unchanged
        chunks: list[np.ndarray] = []
        sr, total = 0, 0

        def take(frame_list):
            nonlocal sr, total
            for fr in frame_list:
                sr = sr or int(fr.sample_rate)
                block = fr.to_ndarray().T  # (samples, channels)
                _check_finite(block, src, sr)
                chunks.append(_to_mono(block).astype(np.float32, copy=False))
                total += block.shape[0]
                _check_length(total, sr, src, max_seconds)

        for frame in container.decode(stream):
            take(resampler.resample(frame))
        take(resampler.resample(None))
        declared_s = container.duration / 1e6 if container.duration else None
    if total == 0 or sr <= 0:
        raise src.error("no decodable audio samples (empty or truncated)")
    if _shortfall(declared_s, total / sr):
        raise src.error(
            f"truncated or corrupt: container declares {declared_s:.2f} s, only {total / sr:.2f} s decoded"
        )
    return np.concatenate(chunks), sr


_FFMPEG_ERRORS = (av.error.FFmpegError, ValueError, IndexError, EOFError, OSError)


def _decode(src: _Source, max_seconds: float | None) -> tuple[np.ndarray, int]:
    if src.path is not None and src.path.is_dir():
        raise src.error("is a directory, not an audio file")
    try:
        size = src.size()
        if size == 0:
            raise src.error("empty file (0 bytes)")
        with src.open() as fh:
            kind = sniff_format(fh.read(64))
            short = _wav_declared_shortfall(fh, size) if kind == "wav" else None
            ogg_seconds = _ogg_declared_seconds(fh, size) if kind == "ogg" else None
    except OSError as exc:
        raise src.error(f"cannot read file ({exc.strerror or exc})") from exc
    if short is not None:
        raise src.error(f"truncated: data chunk declares {short[0]} bytes, file holds {short[1]}")
    sf_cause = None
    if kind in _SOUNDFILE_FORMATS:
        try:
            y, sr = _decode_soundfile(src, max_seconds)
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
            if _shortfall(ogg_seconds, len(y) / sr):
                raise src.error(
                    f"truncated or corrupt: stream declares {ogg_seconds:.2f} s, only {len(y) / sr:.2f} s decoded"
                )
            return y, sr
    try:
        y, sr = _decode_pyav(src, max_seconds)
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


def _finish(src: _Source, sr: int | None, max_seconds: float | None) -> np.ndarray:
    if sr is not None and (int(sr) != sr or sr <= 0):
        raise ValueError(f"sr must be a positive integer, got {sr!r}")
    y, native = _decode(src, max_seconds)
    return _check_overflow(y if sr is None else resample(y, native, int(sr)), src)


def decode_native(path: PathLike, *, max_seconds: float | None = DEFAULT_MAX_SECONDS) -> tuple[np.ndarray, int]:
    """Decode ``path`` at its own sample rate: ``(mono float32 waveform, rate)``."""
    src = _Source(os.fspath(path), path=Path(path))
    y, sr = _decode(src, max_seconds)
    return _check_overflow(y, src), sr


def load(path: PathLike, sr: int = 16000, *, max_seconds: float | None = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Decode ``path`` to a 1-D float32 mono waveform at ``sr`` Hz.

    Any channel count (mono = mean of channels) and any source rate; soxr 'HQ'
    resampling.  Bit-identical to ``librosa.load(path, sr=sr)[0]`` whenever
    libsndfile can read the file.  ``max_seconds=None`` lifts the length limit.

    Raises:
        AudioDecodeError: empty, truncated, corrupt, unsupported, too long, or
            containing NaN/inf samples (the message names the file and cause).
    """
    return _finish(_Source(os.fspath(path), path=Path(path)), sr, max_seconds)


def load_audio_bytes(
    data: bytes, name: str, sr: int = 16000, *, max_seconds: float | None = DEFAULT_MAX_SECONDS
) -> np.ndarray:
    """Decode an in-memory upload; ``name`` is only used in error messages.

    The format is sniffed from the content, so a webm recording uploaded as
    ``cough.wav`` still decodes.  Same output and errors as :func:`load`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return _finish(_Source(name, data=bytes(data)), sr, max_seconds)


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
    "DEFAULT_MAX_SECONDS",
    "decode_native",
    "load",
    "load_audio_bytes",
    "load_many",
    "resample",
    "sniff_format",
]
