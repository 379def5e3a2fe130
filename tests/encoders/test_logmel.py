"""logmel-stats: a documented, deterministic, fixed-size summary that separates real acoustic differences."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from respiramfm.audio import opera_spectrogram
from respiramfm.encoders.logmel import STATS, LogMelStatsEncoder, logmel_stats
from respiramfm.errors import AudioDecodeError

SR = 16000


def _stats(wave: np.ndarray) -> np.ndarray:
    """(6, 64) statistics of a 16 kHz waveform through the real OPERA front end."""
    return logmel_stats(opera_spectrogram(wave.astype(np.float32), SR)).reshape(len(STATS), 64)


def _tone(freq: float, seconds: float = 3.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return 0.5 * np.sin(2 * np.pi * freq * t)


def test_pure_tone_lights_its_mel_bin_and_noise_is_flat():
    centres = librosa.mel_frequencies(64 + 2, fmin=50, fmax=8000)[1:-1]
    tone = _stats(_tone(1000.0))
    expected_bin = int(np.argmin(np.abs(centres - 1000.0)))
    assert int(np.argmax(tone[0])) == expected_bin
    assert tone[0, expected_bin] > 0.9 and np.median(tone[0]) < 0.1

    noise = _stats(np.random.default_rng(0).standard_normal(3 * SR) * 0.1)
    assert noise[0].min() > 0.5 and np.ptp(noise[0]) < 0.2  # white noise: every band about as loud
    # a different tone lands in a different bin
    assert int(np.argmax(_stats(_tone(3000.0))[0])) > expected_bin + 10


def test_flux_and_std_separate_a_pulsed_tone_from_a_steady_one():
    steady = _stats(_tone(1000.0))
    t = np.arange(3 * SR) / SR
    pulsed = _stats(_tone(1000.0) * (np.sin(2 * np.pi * 4 * t) > 0))
    b = int(np.argmax(steady[0]))
    flux, std = STATS.index("flux"), STATS.index("std")
    assert steady[flux, b] < 0.01 and pulsed[flux, b] > 0.1
    assert steady[std, b] < 0.01 and pulsed[std, b] > 0.2


def test_statistics_by_hand_on_a_known_spectrogram():
    spec = np.zeros((5, 64), dtype=np.float32)
    spec[:, 0] = [0.0, 0.25, 0.5, 0.75, 1.0]
    spec[:, 1] = [1.0, 0.0, 1.0, 0.0, 1.0]
    f = logmel_stats(spec).reshape(6, 64)
    np.testing.assert_allclose(f[:, 0], [0.5, np.sqrt(0.125), 0.1, 0.5, 0.9, 0.25], rtol=1e-6)
    np.testing.assert_allclose(f[:, 1], [0.6, np.sqrt(0.24), 0.0, 1.0, 1.0, 1.0], rtol=1e-6, atol=1e-7)
    assert np.all(f[:, 2:] == 0)
    assert f.dtype == np.float32


def test_encoder_shape_determinism_and_batch_independence(shared_data):
    from respiramfm.audio import load

    enc = LogMelStatsEncoder()
    assert enc.out_dim == 384 == len(enc.feature_names())
    assert enc.feature_names()[64 * 4 + 12] == "p90[12]"
    wave = load(sorted((shared_data / "kauh" / "AudioFiles").glob("*.wav"))[0], sr=SR)
    specs = [opera_spectrogram(wave, SR), np.random.default_rng(1).random((300, 64), dtype=np.float32),
             np.random.default_rng(2).random((1, 64), dtype=np.float32)]
    out = enc.encode(specs)
    assert out.shape == (3, 384) and out.dtype == np.float32 and np.isfinite(out).all()
    for i, s in enumerate(specs):
        assert np.array_equal(enc.encode([s])[0], out[i])  # no dependence on the rest of the batch
    assert np.array_equal(enc.encode(specs), out)
    assert np.all(out[2, 64:128] == 0) and np.all(out[2, 5 * 64:] == 0)  # one frame: no spread, no flux
    assert enc.encode([]).shape == (0, 384)


def test_weights_hash_names_the_settings():
    a, b = LogMelStatsEncoder(), LogMelStatsEncoder()
    assert a.weights_hash == b.weights_hash and len(a.weights_hash) == 64
    assert LogMelStatsEncoder(n_mels=32).weights_hash != a.weights_hash
    # pinned: a change here silently invalidates (or worse, aliases) every cached logmel-stats vector
    assert a.weights_hash == "ed78138554beb5583db40717bef9fc951ecde873bfbff3629eb13ece60a8f17a"


def test_bad_spectrograms_raise_typed_errors():
    enc = LogMelStatsEncoder()
    with pytest.raises(AudioDecodeError, match="0 frames"):
        enc.encode([np.zeros((0, 64), np.float32)])
    bad = np.zeros((10, 64), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(AudioDecodeError, match="non-finite"):
        enc.encode([bad])
    with pytest.raises(ValueError, match="expected"):
        enc.encode([np.zeros((10, 32), np.float32)])
