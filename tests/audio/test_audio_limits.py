"""Decode limits (native rate, decoded-samples budget, per-block checks) and the content check's thresholds."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import soundfile as sf

from respiramfm.audio import MAX_NATIVE_RATE, MIN_SECONDS, SILENCE_DBFS, check_content, load, load_audio_bytes
from respiramfm.audio.content import measure
from respiramfm.errors import AudioContentError, AudioDecodeError


def wav(y: np.ndarray, sr: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def tone(sr: int, seconds: float, amplitude: float = 0.3, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    y = (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([y] * channels, axis=1) if channels > 1 else y


def test_native_rate_limit_is_inclusive():
    assert load_audio_bytes(wav(tone(MAX_NATIVE_RATE, 0.05), MAX_NATIVE_RATE), "a").shape == (800,)
    with pytest.raises(AudioDecodeError, match=f"{MAX_NATIVE_RATE + 1} Hz is above the maximum"):
        load_audio_bytes(wav(tone(MAX_NATIVE_RATE + 1, 0.05), MAX_NATIVE_RATE + 1), "b")


def test_budget_counts_every_channel_and_max_samples_overrides():
    data = wav(tone(16000, 1.0, channels=8), 16000)  # 128,000 samples in all
    assert load_audio_bytes(data, "ok", max_samples=128_000).shape == (16000,)
    with pytest.raises(AudioDecodeError, match=r"budget of 127999 samples: the header declares 128000 "
                                                r"\(16000 frames x 8 channels at 16000 Hz\)"):
        load_audio_bytes(data, "over", max_samples=127_999)
    # the default budget follows max_seconds: 1 s x 96,000 samples/s < 128,000
    with pytest.raises(AudioDecodeError, match="budget of 96000 samples"):
        load_audio_bytes(data, "default", max_seconds=1.0)
    assert load_audio_bytes(data, "lifted", max_seconds=None).shape == (16000,)


def test_budget_is_enforced_while_ffmpeg_decodes():
    """A webm (no sample count in the header) stops at the budget instead of decoding everything."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as out:
        stream = out.add_stream("libopus", rate=48000, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone(48000, 2.0)[None, :], format="fltp", layout="mono")
        frame.sample_rate = 48000
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            out.mux(packet)
    data = buf.getvalue()
    assert len(load_audio_bytes(data, "whole")) == pytest.approx(32000, abs=400)
    with pytest.raises(AudioDecodeError, match="budget of 20000 samples"):
        load_audio_bytes(data, "cut", max_samples=20_000)


def test_non_finite_sample_position_is_exact_past_the_first_block(tmp_path):
    y = tone(16000, 20.0)
    y[300_000] = np.nan  # in the second 262,144-frame block
    path = tmp_path / "late_nan.wav"
    path.write_bytes(wav(y, 16000, "FLOAT"))
    with pytest.raises(AudioDecodeError, match=r"1 of \d+ samples are NaN or infinite \(first at 18.750 s\)"):
        load(path)


def test_flac_of_unknown_length_is_counted_while_decoding():
    """libsndfile reports an unknown length as 2**63-1 frames: never allocated, never taken as the length."""
    buf = io.BytesIO()
    sf.write(buf, tone(16000, 1.5), 16000, format="FLAC")
    data = bytearray(buf.getvalue())
    bits = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)  # total samples: 0 = unknown
    data[18:26] = bits.to_bytes(8, "big")
    # libsndfile cannot read past the unknown end of a short stream: a typed error, not a 2**63-frame allocation
    # (a long one is cut at the budget: see the decode bombs in tests/test_bad_input_corpus.py)
    with pytest.raises(AudioDecodeError, match="corrupt flac data"):
        load_audio_bytes(bytes(data), "streamed")


def test_trimmed_duration_ignores_surrounding_silence():
    quiet = np.zeros(16000, np.float32)
    c = measure(np.concatenate([quiet, tone(16000, 0.3), quiet]), 16000)
    assert c.seconds == pytest.approx(2.3) and 0.3 <= c.trimmed_seconds <= 0.4  # trim frames: 0.05-s hops


@pytest.mark.parametrize("seconds, ok", [(MIN_SECONDS + 0.02, True), (MIN_SECONDS - 0.05, False)])
def test_minimum_duration_after_trimming(seconds, ok):
    y = tone(16000, seconds)
    c = measure(y, 16000)
    assert c.trimmed_seconds == pytest.approx(seconds, abs=1e-3)
    if ok:
        assert check_content(y, 16000) == c
    else:
        with pytest.raises(AudioContentError, match="too short to score"):
            check_content(y, 16000, name="short.wav")


@pytest.mark.parametrize("db, ok", [(SILENCE_DBFS + 1, True), (SILENCE_DBFS - 1, False)])
def test_silence_threshold(db, ok):
    y = tone(16000, 1.0, amplitude=10 ** (db / 20)) + np.float32(0.2)  # a DC offset does not count as sound
    assert measure(y, 16000).peak_dbfs == pytest.approx(db, abs=0.01)
    if ok:
        check_content(y, 16000)
    else:
        with pytest.raises(AudioContentError, match=r"silent: peak -61.0 dBFS") as info:
            check_content(y, 16000, name="quiet.wav")
        assert info.value.path == "quiet.wav" and isinstance(info.value, AudioDecodeError)
