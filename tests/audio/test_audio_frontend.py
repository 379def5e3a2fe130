"""OPERA front end: parity with the OPERA reference fixture, each step against librosa/the spec, properties."""

from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from respiramfm.audio import (
    FrontendConfig,
    load,
    opera_spectrogram,
    opera_spectrogram_batch,
    opera_spectrogram_files,
    peak_window,
    preprocess_wave,
    repeat_pad,
    trim_bounds,
)
from respiramfm.audio.melspec import logmel_batch, logmel_numpy
from respiramfm.config import from_dict, to_dict
from respiramfm.errors import AudioDecodeError, ConfigError

SR = 16000
MEL_ARGS = (SR, 1024, 512, 64, 50.0, 8000.0, 80.0)


def reference_entries(opera_fixtures: Path, data: Path | None) -> list[tuple[Path, np.ndarray]]:
    ref = np.load(opera_fixtures / "opera_frontend_reference.npz")
    count = len([k for k in ref.files if k.startswith("name_")])
    out = []
    for i in range(count):
        name = str(ref[f"name_{i}"])
        places = [opera_fixtures / name]
        if data is not None:
            places += [data / "icbhi" / "audio_and_txt_files" / name, data / "kauh" / "AudioFiles" / name]
        found = [p for p in places if p.is_file()]
        assert found, f"reference input {name} not found"
        out.append((found[0], ref[f"spec_{i}"]))
    return out


def breathing(seconds: float, seed: int = 0, quiet_edges: float = 0.0) -> np.ndarray:
    """Amplitude-modulated noise, optionally with near-silent lead-in/out (to exercise trimming)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    y = 0.3 * (0.2 + np.sin(np.pi * 0.3 * t) ** 2) * rng.standard_normal(n)
    edge = int(quiet_edges * SR)
    if edge:
        y[:edge] *= 1e-5
        y[-edge:] *= 1e-5
    return y.astype(np.float32)


# ----------------------------------------------------------------------------- parity with OPERA


def test_parity_with_opera_reference(opera_fixtures, shared_data):
    entries = reference_entries(opera_fixtures, shared_data)
    assert len(entries) == 7
    waves = [load(path) for path, _ in entries]
    batch = opera_spectrogram_batch(waves)
    worst_batch = worst_single = 0.0
    for (path, ref), wave, spec in zip(entries, waves, batch):
        single = opera_spectrogram(wave)
        assert spec.shape == ref.shape == single.shape, path.name
        assert spec.dtype == np.float32
        worst_batch = max(worst_batch, float(np.abs(spec - ref).max()))
        worst_single = max(worst_single, float(np.abs(single - ref).max()))
    # Measured: ~1.2e-7 for both paths (librosa computes its power/dB in float32).
    assert worst_batch <= 1e-4 and worst_single <= 1e-4, (worst_batch, worst_single)
    assert worst_batch <= 1e-6 and worst_single <= 1e-6, (worst_batch, worst_single)


def test_parity_files_path_and_resampling_entry(opera_fixtures, shared_data):
    entries = reference_entries(opera_fixtures, shared_data)
    specs = opera_spectrogram_files([p for p, _ in entries], workers=2)
    for (path, ref), spec in zip(entries, specs):
        assert isinstance(spec, np.ndarray), spec
        assert float(np.abs(spec - ref).max()) <= 1e-6, path.name
    # the single-clip API resamples a native-rate clip itself (soxr HQ, like librosa.load)
    path, ref = entries[-1]  # 1.2 s ICBHI excerpt at 44.1 kHz
    native, sr = librosa.load(path, sr=None)
    assert sr == 44100
    assert float(np.abs(opera_spectrogram(native, sr=sr) - ref).max()) <= 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parity_on_cuda(opera_fixtures, shared_data):
    entries = reference_entries(opera_fixtures, shared_data)
    waves = [load(path) for path, _ in entries] + [np.zeros(8000, np.float32)]
    specs = opera_spectrogram_batch(waves, device="cuda")
    for (path, ref), spec in zip(entries, specs):
        assert float(np.abs(spec - ref).max()) <= 1e-6, path.name
    assert specs[-1].shape == (251, 64) and not specs[-1].any()


# ----------------------------------------------------------------------------- steps vs librosa / the spec


def test_trim_matches_librosa():
    signals = [
        breathing(3.0, 1, quiet_edges=0.7),
        breathing(2.0, 2, quiet_edges=0.05),
        np.concatenate([np.zeros(5000, np.float32), breathing(1.0, 3), np.zeros(12345, np.float32)]),
        breathing(0.3, 4),
        np.zeros(4000, np.float32),  # digital silence: librosa keeps everything
        np.float32(1e-7) * breathing(1.0, 5),
    ]
    rng = np.random.default_rng(9)
    for k in range(10):  # random piecewise loudness, some pieces 50-70 dB down
        gains = 10.0 ** (-rng.uniform(0, 4, size=6))
        y = np.concatenate([g * breathing(rng.uniform(0.05, 0.6), 10 + k * 6 + j) for j, g in enumerate(gains)])
        signals.append(y.astype(np.float32))
    trimmed_any = False
    for y in signals:
        _, (start, end) = librosa.effects.trim(y, frame_length=1600, hop_length=800)
        assert trim_bounds(y) == (int(start), int(end))
        trimmed_any |= (start, end) != (0, len(y))
    assert trimmed_any
    for frame, hop in [(1000, 300), (1601, 800), (2400, 800), (512, 128)]:  # other framings
        for y in signals[:3] + signals[-3:]:
            _, (start, end) = librosa.effects.trim(y, top_db=40, frame_length=frame, hop_length=hop)
            assert trim_bounds(y, 40, frame, hop) == (int(start), int(end)), (frame, hop)
    start, end = trim_bounds(signals[0])
    assert 0.6 * SR < start < 0.75 * SR and 2.25 * SR < end < 2.4 * SR


def test_repeat_pad_follows_opera_duplicate_padding():
    x = np.arange(1, 8, dtype=np.float32)  # L = 7
    out = repeat_pad(x, 20)  # left = 13
    # OPERA: double the clip until it covers `left`, take its last `left` samples, then the clip
    aug = x
    while len(aug) < 13:
        aug = np.concatenate([aug, aug])
    np.testing.assert_array_equal(out, np.concatenate([aug[len(aug) - 13 :], x]))
    np.testing.assert_array_equal(out[-7:], x)
    np.testing.assert_array_equal(out, x[(np.arange(20) - 13) % 7])
    assert repeat_pad(x, 7) is x and repeat_pad(x, 3) is x


def test_preprocess_lengths_per_crop_policy():
    short, long = breathing(1.2, 1), breathing(20.0, 2)
    whole = FrontendConfig()
    assert len(preprocess_wave(short, whole)) == 128000  # padded to 8 s
    assert len(preprocess_wave(long, whole)) == len(long)  # long clips kept whole
    for crop in ("first", "peak"):
        cfg = FrontendConfig(crop=crop)
        assert len(preprocess_wave(short, cfg)) == 130880  # padded to 8.18 s
        assert len(preprocess_wave(long, cfg)) == 130880  # cut to 8.18 s -> 256 frames
        assert opera_spectrogram(long, cfg=cfg).shape == (256, 64)
    np.testing.assert_array_equal(preprocess_wave(long, FrontendConfig(crop="first")), long[:130880])
    # exactly input_sec long: OPERA neither pads nor cuts
    assert len(preprocess_wave(breathing(8.0, 3), FrontendConfig(trim=False))) == 128000


def test_peak_window_is_official_crop_window_around_peak():
    y = np.zeros(200_000, np.float32)
    for peak, start in [(100_000, 100_000 - 65_440), (1_000, 0), (199_000, 200_000 - 130_880)]:
        z = y.copy()
        z[peak] = 1.0
        out = peak_window(z, 130_880)
        assert len(out) == 130_880 and out[peak - start] == 1.0
    assert peak_window(y[:1000], 130_880) is not None and len(peak_window(y[:1000], 130_880)) == 1000
    # "peak" without trimming reproduces get_entire_signal_librosa_trimmed: crop, then pad
    z = breathing(12.0, 4)
    z[90_000] = 2.0
    out = preprocess_wave(z, FrontendConfig(crop="peak", trim=False))
    np.testing.assert_array_equal(out, z[90_000 - 65_440 : 90_000 + 65_440])


def test_silence_and_constant_spectrograms_are_zeros():
    for y in (np.zeros(16000, np.float32), np.full(16000, 1e-9, np.float32)):
        single = opera_spectrogram(y)
        (batch,) = opera_spectrogram_batch([y])
        for spec in (single, batch):
            assert spec.shape == (251, 64) and not np.isnan(spec).any() and not spec.any()


def test_invalid_waveforms_raise_typed_errors():
    cases = [np.zeros(0, np.float32), np.zeros((2, 100), np.float32), np.array([0.1, np.nan], np.float32),
             np.array([1, 2, 3], np.int16)]
    for bad in cases:
        with pytest.raises(AudioDecodeError):
            opera_spectrogram(bad)
        with pytest.raises(AudioDecodeError, match="clip 1"):
            opera_spectrogram_batch([breathing(0.5), bad])


def test_files_path_skips_and_reports_bad_files(tmp_path):
    import soundfile as sf

    good = tmp_path / "good.wav"
    sf.write(good, breathing(3.0, 5), SR, subtype="PCM_16")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    ten_ms = tmp_path / "ten_ms.wav"
    sf.write(ten_ms, (0.3 * np.random.default_rng(6).standard_normal(441)).astype(np.float32), 44100)
    silent = tmp_path / "silent.flac"
    sf.write(silent, np.zeros(30000, np.float32), SR)
    out = opera_spectrogram_files([good, empty, good, ten_ms, silent], workers=1)
    assert isinstance(out[1], AudioDecodeError) and out[1].path == str(empty)
    assert out[0].shape == (251, 64)
    np.testing.assert_array_equal(out[0], out[2])
    assert out[3].shape == (251, 64) and 0 <= out[3].min() < out[3].max() <= 1  # 10 ms -> 160 samples, repeated
    assert out[4].shape == (251, 64) and not out[4].any()


def test_batch_of_mixed_lengths_equals_single_clips():
    waves = [breathing(s, i, quiet_edges=0.1) for i, s in enumerate([0.4, 9.3, 3.0, 17.7, 8.0, 0.05])]
    cfg = FrontendConfig()
    for budget in (None, 1 << 16, 1 << 24):  # one clip per group ... everything in one group
        batch = opera_spectrogram_batch(waves, cfg, max_batch_samples=budget)
        for w, b in zip(waves, batch):
            np.testing.assert_allclose(b, opera_spectrogram(w, cfg=cfg), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- config


def test_config_key_validation_and_roundtrip():
    base = FrontendConfig()
    assert base.key() == FrontendConfig().key()
    assert base.key() == base.replace(crop_sec=9.0).key()  # crop_sec is inert for "whole"
    assert base.key() != base.replace(crop="peak").key() != base.replace(crop="first").key()
    assert base.key() != base.replace(input_sec=2.0).key()
    assert base.replace(trim=False).key() == base.replace(trim=False, trim_top_db=30.0).key()
    assert all(c.isalnum() or c in "._-" for c in base.key())
    assert from_dict(FrontendConfig, to_dict(base)) == base
    for bad in ({"crop": "middle"}, {"n_mels": 0}, {"fmax": 9000.0}, {"input_sec": 0.0}):
        with pytest.raises(ConfigError):
            FrontendConfig(**bad)
    with pytest.raises(ConfigError):
        opera_spectrogram(breathing(1.0), crop="peak", cfg=base)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(min_value=1, max_value=24_000),
    scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e4, 1e30]),
    seed=st.integers(0, 2**16),
    crop=st.sampled_from(["whole", "first", "peak"]),
    input_sec=st.sampled_from([0.3, 1.0]),
    trim=st.booleans(),
)
def test_any_finite_input_gives_a_valid_spectrogram(n, scale, seed, crop, input_sec, trim):
    y = (scale * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)
    cfg = FrontendConfig(input_sec=input_sec, crop=crop, crop_sec=input_sec + 0.05, trim=trim)
    n_after = len(preprocess_wave(y, cfg))
    single = opera_spectrogram(y, cfg=cfg)
    (batch,) = opera_spectrogram_batch([y], cfg)
    for spec in (single, batch):
        assert spec.shape == (1 + n_after // 512, 64)
        assert spec.dtype == np.float32
        assert np.isfinite(spec).all() and spec.min() >= 0.0 and spec.max() <= 1.0
    np.testing.assert_allclose(single, batch, atol=1e-6, rtol=0)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(min_value=1, max_value=6000), seed=st.integers(0, 2**16))
def test_logmel_paths_agree_without_preprocessing(n, seed):
    y = np.random.default_rng(seed).uniform(-1, 1, n).astype(np.float32)
    a = logmel_numpy(y, *MEL_ARGS)
    (b,) = logmel_batch([y], *MEL_ARGS)
    assert a.shape == b.shape == (1 + n // 512, 64)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
