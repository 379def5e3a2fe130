"""Decoding: every valid format, every malformed input (all generated here), and librosa parity."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import av
import librosa
import numpy as np
import pytest
import soundfile as sf

from respiramfm.audio import decode_native, load, load_audio_bytes, load_many, resample, sniff_format
from respiramfm.errors import AudioDecodeError

RNG = np.random.default_rng(1234)
NOISE = (0.1 * RNG.standard_normal(16000)).astype(np.float32)  # 1 s at 16 kHz


def tone(sr: int, seconds: float = 1.0, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    y = 0.3 * np.sin(2 * np.pi * freq * t)
    if channels > 1:
        y = np.stack([y * (1 + 0.1 * c) for c in range(channels)], axis=1)
    return y.astype(np.float32)


def sf_bytes(y: np.ndarray, sr: int = 16000, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def pyav_bytes(y: np.ndarray, fmt: str, codec: str, rate: int = 48000) -> bytes:
    """Encode mono float32 ``y`` (already at ``rate``) with FFmpeg through PyAV."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(y[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def dominant_hz(y: np.ndarray, sr: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.argmax(spec) * sr / len(y))


# ----------------------------------------------------------------------------- valid formats


@pytest.mark.parametrize(
    "fmt,subtype,ext",
    [
        ("WAV", "PCM_U8", "wav"),
        ("WAV", "PCM_16", "wav"),
        ("WAV", "PCM_24", "wav"),
        ("WAV", "PCM_32", "wav"),
        ("WAV", "FLOAT", "wav"),
        ("WAV", "DOUBLE", "wav"),
        ("FLAC", "PCM_16", "flac"),
        ("OGG", "VORBIS", "ogg"),
        ("MP3", "MPEG_LAYER_III", "mp3"),
        ("AIFF", "PCM_16", "aiff"),
    ],
)
def test_soundfile_formats_match_librosa(tmp_path, fmt, subtype, ext):
    src = tone(44100, 1.0, channels=2)
    path = write(tmp_path, f"clip.{ext}", sf_bytes(src, 44100, fmt, subtype))
    y = load(path)
    ref, _ = librosa.load(path, sr=16000)
    assert y.dtype == np.float32 and y.ndim == 1
    np.testing.assert_array_equal(y, ref)
    assert abs(len(y) - 16000) <= 1200  # mp3/vorbis add codec padding
    assert abs(dominant_hz(y) - 440) < 5


def test_webm_opus_decodes(tmp_path):
    src = tone(48000, 1.0)
    path = write(tmp_path, "upload.webm", pyav_bytes(src, "webm", "libopus"))
    assert sniff_format(path.read_bytes()[:16]) == "webm"
    y = load(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - 16000) < 400
    assert abs(dominant_hz(y) - 440) < 5
    assert 0.15 < np.abs(y).max() < 0.45  # lossy, but the level survives


def test_ogg_opus_and_mp4_aac_decode(tmp_path):
    src = tone(48000, 1.0)
    for name, fmt, codec in [("a.opus", "ogg", "libopus"), ("a.m4a", "mp4", "aac")]:
        y = load(write(tmp_path, name, pyav_bytes(src, fmt, codec)))
        assert abs(len(y) - 16000) < 600, name
        assert abs(dominant_hz(y) - 440) < 5, name


def test_sniffing_ignores_the_extension(tmp_path):
    src = tone(16000, 0.5)
    flac = sf_bytes(src, 16000, "FLAC")
    good = load(write(tmp_path, "ok.flac", flac))
    np.testing.assert_array_equal(load(write(tmp_path, "really_flac.wav", flac)), good)
    np.testing.assert_array_equal(load(write(tmp_path, "really_flac.mp3", flac)), good)
    wav = sf_bytes(src, 16000, "WAV", "PCM_16")
    np.testing.assert_array_equal(load(write(tmp_path, "really_wav.webm", wav)), load(write(tmp_path, "w.wav", wav)))
    webm = pyav_bytes(tone(48000, 0.5), "webm", "libopus")
    np.testing.assert_array_equal(load(write(tmp_path, "really_webm.wav", webm)), load(write(tmp_path, "r.webm", webm)))


def test_bytes_and_path_agree(tmp_path):
    data = sf_bytes(tone(44100, 0.7, channels=2), 44100, "WAV", "PCM_24")
    path = write(tmp_path, "x.wav", data)
    np.testing.assert_array_equal(load_audio_bytes(data, "upload.bin"), load(path))
    y, sr = decode_native(path)
    assert sr == 44100 and len(y) == int(44100 * 0.7)
    np.testing.assert_array_equal(resample(y, 44100, 16000), load(path))


def test_sniff_format_labels():
    assert sniff_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") == "wav"
    assert sniff_format(b"fLaC\x00\x00\x00\x22") == "flac"
    assert sniff_format(b"OggS\x00\x02" + bytes(8)) == "ogg"
    assert sniff_format(b"ID3\x04\x00" + bytes(8)) == "mp3"
    assert sniff_format(b"\xff\xfb\x90\x64" + bytes(8)) == "mp3"
    assert sniff_format(b"\xff\xf1\x50\x80" + bytes(8)) == "aac"
    assert sniff_format(b"\x1aE\xdf\xa3" + bytes(8)) == "webm"
    assert sniff_format(b"\x00\x00\x00\x1cftypisom") == "mp4"
    assert sniff_format(b"FORM\x00\x00\x00\x00AIFF") == "aiff"
    assert sniff_format(b"hello world!") is None
    assert sniff_format(b"") is None


# ----------------------------------------------------------------------------- edge cases that decode


def test_extreme_rates_channels_and_lengths(tmp_path):
    cases = {
        "rate_1k.wav": (tone(1000, 1.0, freq=200), 1000, 16000),
        "rate_192k.wav": (tone(192000, 0.5), 192000, 8000),
        "eight_channels.wav": (tone(16000, 0.5, channels=8), 16000, 8000),
        "ten_ms.wav": (tone(44100, 0.01), 44100, 160),
    }
    for name, (y, sr, n_out) in cases.items():
        path = write(tmp_path, name, sf_bytes(y, sr, "WAV", "PCM_16"))
        out = load(path)
        ref, _ = librosa.load(path, sr=16000)
        assert len(out) == n_out, name
        np.testing.assert_array_equal(out, ref)
    eight = load(tmp_path / "eight_channels.wav")
    # mono = mean of channels: channel c is (1 + 0.1 c) * tone, so the mean is 1.35 * tone
    assert abs(np.abs(eight).max() - 0.3 * 1.35) < 2e-3


def test_silent_and_clipped_files_decode(tmp_path):
    silent = load(write(tmp_path, "silent.wav", sf_bytes(np.zeros(8000, np.float32), 16000, "WAV", "PCM_16")))
    assert silent.shape == (8000,) and not silent.any()
    clipped_src = np.clip(5 * tone(16000, 0.5), -1, 1)  # peaks at 1.5 before clipping
    clipped = load(write(tmp_path, "clipped.wav", sf_bytes(clipped_src, 16000, "WAV", "PCM_16")))
    assert np.isclose(np.abs(clipped).max(), 1.0, atol=1e-4)
    assert (np.abs(clipped) > 0.999).mean() > 0.3


# ----------------------------------------------------------------------------- malformed input


def _wav() -> bytes:
    return sf_bytes(NOISE, 16000, "WAV", "PCM_16")


def _float_wav(y: np.ndarray) -> bytes:
    return sf_bytes(y, 16000, "WAV", "FLOAT")


def _with_nan() -> bytes:
    y = NOISE.copy()
    y[4000] = np.nan
    return _float_wav(y)


def _with_inf() -> bytes:
    y = NOISE.copy()
    y[9000:9010] = -np.inf
    return _float_wav(y)


def _bad_codec_tag() -> bytes:
    data = bytearray(_wav())
    data[20:22] = struct.pack("<H", 0x7A7A)  # fmt chunk: unknown codec tag
    return bytes(data)


def _zero_data_chunk() -> bytes:
    return sf_bytes(np.zeros(0, np.float32), 16000, "WAV", "PCM_16")


def _truncated(blob: bytes, keep: float) -> bytes:
    return blob[: int(len(blob) * keep)]


def _corrupt_middle(blob: bytes) -> bytes:
    data = bytearray(blob)
    mid = len(data) // 2
    data[mid : mid + 200] = np.random.default_rng(7).bytes(200)
    return bytes(data)


MALFORMED = {
    "zero_bytes.wav": (lambda: b"", "empty file"),
    "truncated_header.wav": (lambda: _wav()[:30], "cannot decode wav"),
    "header_only.wav": (lambda: _wav()[:44], "truncated"),
    "truncated_data.wav": (lambda: _truncated(_wav(), 0.6), "truncated"),
    "random_bytes.wav": (lambda: np.random.default_rng(3).bytes(4096), "cannot decode"),
    "text_file.wav": (lambda: b"patient id,age\n101,3\n" * 50, "cannot decode"),
    "png_image.wav": (lambda: b"\x89PNG\r\n\x1a\n" + bytes(300), "no audio stream|cannot decode"),
    "unknown_codec.wav": (_bad_codec_tag, "cannot decode wav"),
    "partial_nan.wav": (_with_nan, r"1 of 16000 samples are NaN or infinite \(first at 0.250 s\)"),
    "partial_inf.wav": (_with_inf, "10 of 16000 samples are NaN or infinite"),
    "all_nan.wav": (lambda: _float_wav(np.full(500, np.nan, np.float32)), "every sample is NaN"),
    "zero_length_data.wav": (_zero_data_chunk, "no audio samples"),
    "truncated.flac": (lambda: _truncated(sf_bytes(NOISE, 16000, "FLAC"), 0.5), "corrupt flac"),
    "corrupt.flac": (lambda: _corrupt_middle(sf_bytes(NOISE, 16000, "FLAC")), "corrupt flac"),
    "truncated.ogg": (lambda: _truncated(sf_bytes(NOISE, 16000, "OGG"), 0.5), "truncated"),
    "corrupt.ogg": (lambda: _corrupt_middle(sf_bytes(NOISE, 16000, "OGG")), "truncated or corrupt"),
    "truncated.mp3": (lambda: _truncated(sf_bytes(NOISE, 16000, "MP3"), 0.5), "truncated or corrupt"),
    "truncated.webm": (lambda: _truncated(pyav_bytes(tone(48000, 1.0), "webm", "libopus"), 0.5), "truncated"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_input_raises_typed_error(tmp_path, name):
    build, pattern = MALFORMED[name]
    path = write(tmp_path, name, build())
    with pytest.raises(AudioDecodeError, match=pattern) as info:
        load(path)
    assert info.value.path == str(path)
    assert name in str(info.value)
    with pytest.raises(AudioDecodeError, match=pattern):
        load_audio_bytes(path.read_bytes(), name)


def test_missing_file_directory_and_limits(tmp_path):
    with pytest.raises(AudioDecodeError, match="cannot read file"):
        load(tmp_path / "nope.wav")
    with pytest.raises(AudioDecodeError, match="is a directory"):
        load(tmp_path)
    path = write(tmp_path, "two_seconds.wav", sf_bytes(tone(16000, 2.0), 16000, "WAV", "PCM_16"))
    with pytest.raises(AudioDecodeError, match="max_seconds=1"):
        load(path, max_seconds=1.0)
    webm = write(tmp_path, "two_seconds.webm", pyav_bytes(tone(48000, 2.0), "webm", "libopus"))
    with pytest.raises(AudioDecodeError, match="max_seconds=1"):
        load(webm, max_seconds=1.0)
    assert len(load(path, max_seconds=None)) == 32000
    with pytest.raises(ValueError):
        load(path, sr=0)


def test_load_many_reports_errors_in_place(tmp_path):
    good = write(tmp_path, "good.wav", _wav())
    bad = write(tmp_path, "bad.wav", b"")
    out = load_many([good, bad, good], workers=2)
    assert isinstance(out[1], AudioDecodeError) and out[1].path == str(bad)
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_array_equal(out[0], load(good))


# ----------------------------------------------------------------------------- real recordings


def test_real_recordings_match_librosa(shared_data):
    files = sorted((shared_data / "icbhi" / "audio_and_txt_files").glob("*.wav"))
    files += sorted((shared_data / "kauh" / "AudioFiles").glob("*.wav"))[:8]
    assert len(files) >= 12
    kinds = set()
    for path in files:
        info = sf.info(str(path))
        kinds.add((info.samplerate, info.subtype))
        y = load(path)
        ref, _ = librosa.load(path, sr=16000)
        assert y.dtype == np.float32 and y.shape == ref.shape, path.name
        assert float(np.abs(y - ref).max()) <= 1e-6, path.name
    rates = {sr for sr, _ in kinds}
    subtypes = {st for _, st in kinds}
    assert {44100, 4000} <= rates and {"PCM_16", "PCM_24", "PCM_32"} <= subtypes
