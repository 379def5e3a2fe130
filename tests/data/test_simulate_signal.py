"""The simulated biomarkers are really in the audio, and audio/text are informative but not trivial.

Numbers are printed (``pytest -s``) so they can be quoted; the seed is fixed, so
each run measures the same cohort.
"""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import soundfile as sf
from scipy import signal
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from respiramfm.data.records import read_manifest
from respiramfm.data.simulate import SimConfig, simulate_cohort, simulated_tasks


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_signal")
    # One recording per patient keeps held-out samples independent, so a modest cohort gives stable AUROCs.
    cfg = SimConfig(seed=0, n_patients=180, recordings_per_patient=1, datasets=("sim_covid_phone", "sim_lung_clinic"),
                    clip_seconds=(3.0, 4.0))
    manifest = simulate_cohort(out, cfg)
    recs = read_manifest(manifest)
    audio = {r.record_id: sf.read(out / r.audio_path) for r in recs}
    return recs, audio


def band_peakiness(x: np.ndarray, sr: int, lo: float = 400, hi: float = 1000) -> float:
    """90th percentile over 64 ms frames of (max / median) power in [lo, hi] Hz: high for tones."""
    f, _, z = signal.stft(x, sr, nperseg=int(0.064 * sr))
    p = np.abs(z[(f >= lo) & (f <= hi)]) ** 2
    return float(np.percentile(p.max(0) / (np.median(p, 0) + 1e-20), 90))


def transient_count(x: np.ndarray, sr: int) -> int:
    """Short spikes standing 3x above the running level of the >150 Hz signal (4 ms frames)."""
    y = signal.sosfilt(signal.butter(2, 150, "highpass", fs=sr, output="sos"), x)
    hop = max(int(0.004 * sr), 1)
    n = y.size // hop
    peak = np.abs(y[: n * hop]).reshape(n, hop).max(axis=1)
    level = signal.medfilt(peak, 51) + 1e-9
    return len(signal.find_peaks(peak / level, height=3.0, distance=3)[0])


def high_band_share(x: np.ndarray, sr: int) -> float:
    """Energy 1.5-5 kHz over energy 0.1-1.5 kHz, in the loudest 20% of 32 ms frames (the coughs)."""
    f, _, z = signal.stft(x, sr, nperseg=int(0.032 * sr))
    p = np.abs(z) ** 2
    loud = p.sum(0) >= np.percentile(p.sum(0), 80)
    hi = p[(f >= 1500) & (f <= 5000)][:, loud].sum()
    lo = p[(f >= 100) & (f < 1500)][:, loud].sum()
    return float(hi / (lo + 1e-20))


def _auc(neg, pos) -> float:
    return roc_auc_score([0] * len(neg) + [1] * len(pos), list(neg) + list(pos))


def test_wheezes_make_a_tonal_peak_between_400_and_1000_hz(cohort):
    recs, audio = cohort
    lung = [r for r in recs if r.audio_type == "lung"]
    clean = [band_peakiness(*audio[r.record_id]) for r in lung if r.diagnosis == "healthy" and not r.extra["sim_biomarkers"]]
    wheeze = [band_peakiness(*audio[r.record_id]) for r in lung if "wheeze" in r.extra["sim_biomarkers"]]
    auc = _auc(clean, wheeze)
    print(f"\nband peakiness: clean median {np.median(clean):.1f} (n={len(clean)}), "
          f"wheeze median {np.median(wheeze):.1f} (n={len(wheeze)}), AUROC {auc:.3f}")
    assert len(clean) >= 20 and len(wheeze) >= 20
    assert np.median(wheeze) > 3 * np.median(clean) and auc > 0.85


def test_crackles_add_transients(cohort):
    recs, audio = cohort
    lung = [r for r in recs if r.audio_type == "lung"]
    clean = [transient_count(*audio[r.record_id]) for r in lung if r.diagnosis == "healthy" and not r.extra["sim_biomarkers"]]
    crackly = [transient_count(*audio[r.record_id]) for r in lung
               if r.extra["sim_info"]["n_fine_crackles"] + r.extra["sim_info"]["n_coarse_crackles"] >= 3]
    auc = _auc(clean, crackly)
    print(f"\ntransients: clean median {np.median(clean):.1f} (n={len(clean)}), "
          f"crackles median {np.median(crackly):.1f} (n={len(crackly)}), AUROC {auc:.3f}")
    assert len(crackly) >= 20
    assert np.median(crackly) >= np.median(clean) + 2 and auc > 0.8


def test_dry_cough_cue_shifts_energy_upwards(cohort):
    recs, audio = cohort
    cough = [r for r in recs if r.audio_type == "cough"]
    clean = [high_band_share(*audio[r.record_id]) for r in cough if not r.extra["sim_biomarkers"]]
    dry = [high_band_share(*audio[r.record_id]) for r in cough if "dry_cough" in r.extra["sim_biomarkers"]]
    auc = _auc(clean, dry)
    print(f"\nhigh-band share: clean median {np.median(clean):.3f}, dry median {np.median(dry):.3f}, AUROC {auc:.3f}")
    assert len(dry) >= 20 and auc > 0.7


def _logmel(x: np.ndarray, sr: int) -> np.ndarray:
    y = librosa.resample(np.asarray(x, dtype=np.float32), orig_sr=sr, target_sr=16000)
    m = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=16000, n_fft=1024, hop_length=512, n_mels=64,
                                                           fmin=50, fmax=8000), ref=np.max)
    return np.concatenate([m.mean(axis=1), m.std(axis=1)])


def _text(r) -> str:
    items = [f"s:{p}" for p in r.symptoms.split("; ") if p] + [f"h:{p}" for p in r.medical_history.split("; ") if p]
    items += [f"smoker:{r.smoker or 'unknown'}", f"age:{'unknown' if r.age is None else int(r.age // 15)}"]
    return " ".join(i.replace(" ", "_") for i in items)


@pytest.mark.parametrize("task_name", ["SIM-T1", "SIM-T4"])
def test_audio_and_text_are_informative_but_not_trivial(cohort, task_name):
    recs, audio = cohort
    task = next(t for t in simulated_tasks() if t.name == task_name)
    pairs = task.select(recs)
    # Fit on the training patients; every other patient is held out (nothing is tuned here).
    train = [(r, y) for r, y in pairs if r.split == "train"]
    test = [(r, y) for r, y in pairs if r.split in ("val", "test")]
    vec = CountVectorizer(token_pattern=r"\S+", binary=True).fit([_text(r) for r, _ in train])
    logmel = {r.record_id: _logmel(*audio[r.record_id]) for r, _ in pairs}  # once per recording, not per use
    feats = {
        "audio": lambda rs: np.stack([logmel[r.record_id] for r in rs]),
        "text": lambda rs: vec.transform([_text(r) for r in rs]).toarray(),
    }
    feats["both"] = lambda rs: np.hstack([feats["audio"](rs), feats["text"](rs)])
    auc = {}
    for kind, fx in feats.items():
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
        clf.fit(fx([r for r, _ in train]), [y for _, y in train])
        auc[kind] = roc_auc_score([y for _, y in test], clf.predict_proba(fx([r for r, _ in test]))[:, 1])
    print(f"\n{task_name} held-out AUROC (n_train={len(train)}, n_held_out={len(test)}): " + ", ".join(f"{k} {v:.3f}" for k, v in auc.items()))
    assert 0.6 <= auc["audio"] <= 0.97
    assert 0.6 <= auc["text"] <= 0.97
    assert auc["both"] > max(auc["audio"], auc["text"])   # the modalities complement each other
