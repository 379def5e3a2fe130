"""What a container says about itself, read from its bytes before (or instead of) decoding.

* :func:`sniff_format` names the container from its first bytes; the file name is
  never consulted, because users rename files freely.
* :func:`wav_declared_shortfall` and :func:`ogg_declared_seconds` read the
  container's own bookkeeping (the RIFF chunk table, the last Ogg page's granule
  position).  libsndfile quietly returns the decodable prefix of a truncated
  file; comparing what was decoded with what the container declares is how
  :mod:`respiramfm.audio.decode` notices the damage.
"""

from __future__ import annotations

import struct
from typing import BinaryIO


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


def wav_declared_shortfall(fh: BinaryIO, size: int) -> tuple[int, int] | None:
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


def ogg_declared_seconds(fh: BinaryIO, size: int) -> float | None:
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


def shortfall(declared_s: float | None, decoded_s: float) -> bool:
    """Decoded clearly less than declared (codec priming/padding stays within tolerance)."""
    return declared_s is not None and declared_s - decoded_s > max(0.25, 0.05 * declared_s)


__all__ = ["ogg_declared_seconds", "shortfall", "sniff_format", "wav_declared_shortfall"]
