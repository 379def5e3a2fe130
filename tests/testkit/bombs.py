"""Hostile audio, generated in memory: decode bombs and recordings with nothing to hear.

A decode bomb is a small file whose header (or whose content, when the header
says nothing) asks the decoder for far more samples than any recording needs.
Each generator here returns bytes and costs well under a second.
"""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import soundfile as sf


def wav_bytes(y: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def wav_declaring_rate(rate: int, frames: int = 16000) -> bytes:
    """A complete 16-bit mono WAV of quiet noise whose header declares ``rate`` Hz (e.g. 2,147,483,647)."""
    y = (0.1 * np.random.default_rng(5).standard_normal(frames) * 32767).astype("<i2").tobytes()
    byte_rate = min(rate * 2, 0xFFFFFFFF)
    return (b"RIFF" + struct.pack("<I", 36 + len(y)) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, byte_rate, 2, 16)
            + b"data" + struct.pack("<I", len(y)) + y)


def one_sample_wav() -> bytes:
    return wav_bytes(np.array([0.25], np.float32))


def silent_wav(seconds: float = 3.0, sr: int = 16000) -> bytes:
    """Digital silence: every sample zero."""
    return wav_bytes(np.zeros(int(seconds * sr), np.float32), sr)


def flac_silence(rate: int, seconds: float) -> bytes:
    """A real FLAC of silence (constant subframes: ~3.6 bytes per 1000 samples), written in 10 chunks."""
    buf = io.BytesIO()
    chunk = np.zeros(int(rate * seconds) // 10, np.int16)
    with sf.SoundFile(buf, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(10):
            f.write(chunk)
    return buf.getvalue()


def patch_flac(data: bytes, rate: int | None = None, total: int | None = None) -> bytes:
    """Rewrite STREAMINFO's sample rate (20 bits) and/or total sample count (36 bits; 0 = unknown)."""
    b = bytearray(data)
    assert b[:4] == b"fLaC" and b[4] & 0x7F == 0, "STREAMINFO must be the first block"
    bits = int.from_bytes(b[18:26], "big")  # rate:20 channels-1:3 bps-1:5 total:36
    if rate is not None:
        bits = (bits & ~(((1 << 20) - 1) << 44)) | (rate << 44)
    if total is not None:
        bits = (bits & ~((1 << 36) - 1)) | total
    b[18:26] = bits.to_bytes(8, "big")
    return bytes(b)


def wavpack_silence(rate: int, seconds: float, declare_total: int | None = None) -> bytes:
    """WavPack silence at ``rate`` through FFmpeg; ``declare_total`` rewrites every block's total-samples field."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="wv") as out:
        stream = out.add_stream("wavpack", rate=rate, layout="mono")
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
        step = max(1, min(rate, int(rate * seconds)))
        for i in range(max(1, int(round(seconds * rate / step)))):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, step), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i * step
            for f in resampler.resample(frame):
                for packet in stream.encode(f):
                    out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    data = bytearray(buf.getvalue())
    if declare_total is not None:
        pos = data.find(b"wvpk")
        while pos >= 0:
            struct.pack_into("<I", data, pos + 12, declare_total)
            pos = data.find(b"wvpk", pos + 4)
    return bytes(data)


def bombs() -> dict[str, bytes]:
    """Eight decode bombs: five stopped by the header, three only while decoding (their headers lie)."""
    flac384 = flac_silence(384_000, 40.0)
    return {
        "flac_1mhz_120s": patch_flac(flac384, rate=1_048_575, total=int(119.9 * 1_048_575)),
        "flac_384k_100s_declared": patch_flac(flac384, total=384_000 * 100),
        "wavpack_16mhz": wavpack_silence(16_700_000, 0.05),
        "wav_2147483647hz": wav_declaring_rate(2_147_483_647),
        "flac_384k_40s_unknown_length": patch_flac(flac384, total=0),
        "flac_384k_40s": flac384,
        "wavpack_384k_40s_declares_1000": wavpack_silence(384_000, 40.0, declare_total=1000),
        "wavpack_192k_70s_declares_1000": wavpack_silence(192_000, 70.0, declare_total=1000),
    }
