"""The SIMULATED population: diseases, datasets and patients (no audio here).

Each disease is a latent state that shows up in two noisy, partly independent
channels, which is what makes modality comparisons meaningful:

* **audio**: a patient "expresses" the disease acoustically with some
  probability; the cue strength grows with a latent severity plus noise.
  Healthy people sometimes carry weak look-alike cues (colds, smokers).
* **text**: each symptom / history item appears with a disease-specific
  probability scaled by the same severity; some patients are asymptomatic
  and some fields are not reported at all ("" vs the explicit "none").

Unseen diseases share cues with trained ones, so an audio-text alignment
learned on the supervised sets can in principle transfer: asthma wheezes and
prolongs expiration like COPD and reports "wheezing" / "shortness of breath";
pneumonia crackles (as COPD and a TB cough's rattle do) and reports "fever" /
"wet cough".

The dataset table mirrors the paper's task roles (supervised T1-T4, zero-shot
T5-T9) with invented names prefixed ``sim_``; none of it is real data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from respiramfm.data.simulate_audio import Channel, CoughCues, LungCues, Voice


@dataclass(frozen=True)
class Disease:
    symptoms: dict[str, float]        # phrase -> probability at full severity
    history: dict[str, float]
    smoker: float                     # P(smoker)
    age: tuple[float, float, float, float]  # mean, sd, min, max
    asymptomatic: float               # P(no symptoms) at median severity
    express: float                    # P(audio carries the cue)
    positive: bool = True             # a disease (vs a healthy / control group)


_CONTROL_SYMPTOMS = {"runny or blocked nose": 0.25, "sore throat": 0.2, "headache": 0.25, "fatigue": 0.25,
                     "dry cough": 0.2, "shortness of breath": 0.08}
_CONTROL_HISTORY = {"high blood pressure": 0.15, "diabetes": 0.08, "asthma": 0.05}

DISEASES: dict[str, Disease] = {
    "healthy": Disease(_CONTROL_SYMPTOMS, _CONTROL_HISTORY, 0.22, (48, 16, 18, 85), 0.6, 0.15, positive=False),
    "covid": Disease(
        {"fever": 0.45, "dry cough": 0.45, "loss of taste and smell": 0.3, "fatigue": 0.4, "headache": 0.4,
         "sore throat": 0.3, "muscle aches": 0.3, "shortness of breath": 0.2, "chills": 0.2},
        {"high blood pressure": 0.15, "diabetes": 0.08, "asthma": 0.06}, 0.15, (45, 15, 18, 85), 0.4, 0.85),
    "non-covid": Disease(  # tested negative: some were tested because they felt unwell
        {**_CONTROL_SYMPTOMS, "fever": 0.1, "sore throat": 0.25}, _CONTROL_HISTORY, 0.22, (45, 15, 18, 85), 0.55, 0.15,
        positive=False),
    "symptomatic": Disease(
        {"wet cough": 0.4, "dry cough": 0.3, "sore throat": 0.4, "runny or blocked nose": 0.5, "fever": 0.15, "headache": 0.2},
        _CONTROL_HISTORY, 0.25, (40, 15, 18, 85), 0.1, 0.5, positive=False),
    "tb": Disease(
        {"wet cough": 0.5, "night sweats": 0.45, "weight loss": 0.45, "fever": 0.35, "coughing up blood": 0.15,
         "fatigue": 0.35, "chest pain": 0.2},
        {"HIV or impaired immune system": 0.25, "diabetes": 0.1, "previous tuberculosis": 0.2}, 0.4, (38, 13, 18, 80), 0.2, 0.75),
    "non-tb": Disease(
        {"wet cough": 0.4, "dry cough": 0.35, "fever": 0.25, "night sweats": 0.12, "weight loss": 0.12, "fatigue": 0.3,
         "sore throat": 0.2, "chest pain": 0.15},
        {"HIV or impaired immune system": 0.1, "diabetes": 0.1, "previous tuberculosis": 0.08}, 0.3, (38, 14, 18, 80), 0.25, 0.35,
        positive=False),
    "copd": Disease(
        {"shortness of breath": 0.55, "wet cough": 0.4, "wheezing": 0.35, "tightness in the chest": 0.25, "fatigue": 0.3},
        {"COPD/emphysema": 0.25, "high blood pressure": 0.25, "other heart disease": 0.12}, 0.5, (58, 12, 40, 90), 0.4, 0.85),
    "urti": Disease(
        {"runny or blocked nose": 0.6, "sore throat": 0.5, "dry cough": 0.4, "fever": 0.3},
        {}, 0.2, (30, 20, 2, 85), 0.1, 0.4, positive=False),
    "asthma": Disease(
        {"wheezing": 0.5, "shortness of breath": 0.45, "tightness in the chest": 0.4, "dry cough": 0.4},
        {"asthma": 0.3, "allergies": 0.25}, 0.15, (40, 16, 10, 85), 0.4, 0.85),
    "pneumonia": Disease(
        {"fever": 0.4, "wet cough": 0.4, "shortness of breath": 0.35, "chest pain": 0.25, "fatigue": 0.3, "chills": 0.2},
        {"diabetes": 0.15, "high blood pressure": 0.2}, 0.3, (52, 20, 5, 90), 0.4, 0.8),
}


@dataclass(frozen=True)
class Device:
    name: str
    sr: int
    channel: Channel
    weight: float = 1.0


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    audio_type: str                   # "cough" or "lung"
    role: str                         # "supervised" (train/val/test) or "zero-shot" (test only)
    n_patients: int
    recordings: tuple[int, int]       # per patient, inclusive range
    mix: dict[str, float]             # diagnosis -> share of patients
    devices: tuple[Device, ...]
    formats: dict[str, float]         # file format -> share ("ogg" falls back to flac off Opus rates)
    report: dict[str, float]          # P(field reported): symptoms, history, smoker, age, sex
    locations: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()       # stethoscope filter modes: one recording per mode
    cue_scale: float = 1.0            # dataset-level difficulty (weaker cues = harder)
    n_coughs: tuple[int, int] = (2, 4)
    extra: dict = field(default_factory=dict)


_PHONE = Channel(highpass=(80, 200), lowpass=(6000, 14000), eq_bands=2, snr_db=(18, 40), noise_colour=(0.5, 1.5), hum_prob=0.05)
_CROWD = Channel(highpass=(60, 300), lowpass=(5000, 11000), eq_bands=2, snr_db=(12, 30), noise_colour=(0.0, 2.0),
                 hum_prob=0.2, babble_prob=0.35, clip_prob=0.1)
_CLINIC = Channel(highpass=(80, 250), lowpass=(5000, 12000), eq_bands=2, snr_db=(12, 30), noise_colour=(1.0, 2.0), hum_prob=0.3)
_STETH_A = Channel(highpass=(40, 100), lowpass=(1500, 1950), eq_bands=1, snr_db=(20, 35),
                   noise_colour=(0.0, 1.0), artifact_rate=0.15, heart_level=(0.2, 0.8))
_STETH_B = Channel(highpass=(40, 100), lowpass=(1500, 2500), eq_bands=1, snr_db=(22, 38),
                   noise_colour=(0.0, 0.3), artifact_rate=0.15, heart_level=(0.2, 0.8))
_STETH_C = Channel(highpass=(30, 80), lowpass=(1600, 1950), eq_bands=1, snr_db=(15, 30),
                   noise_colour=(0.5, 1.5), artifact_rate=0.25, heart_level=(0.3, 1.0))

_ICBHI_LIKE = ("trachea", "left anterior chest", "right anterior chest", "left posterior chest",
               "right posterior chest", "left lateral chest", "right lateral chest")
_KAUH_LIKE = tuple(f"{s} {side} {zone}" for s in ("posterior", "anterior") for side in ("left", "right")
                   for zone in ("upper", "middle", "lower"))
_FULL = {"symptoms": 0.92, "history": 0.85, "smoker": 0.85, "age": 0.97, "sex": 0.98}

DATASETS: dict[str, DatasetSpec] = {d.name: d for d in (
    DatasetSpec("sim_covid_phone", "cough", "supervised", 110, (2, 2), {"covid": 0.35, "non-covid": 0.65},
                (Device("iPhone", 48000, _PHONE), Device("Android phone", 16000, _PHONE)),
                {"wav": 0.8, "flac": 0.1, "ogg": 0.1}, _FULL, extra={"mirrors": "T1"}),
    DatasetSpec("sim_covid_crowd", "cough", "supervised", 190, (1, 1),
                {"covid": 0.3, "healthy": 0.55, "symptomatic": 0.15},
                (Device("web browser", 44100, _CROWD), Device("Android phone", 22050, _CROWD)),
                {"wav": 0.75, "flac": 0.25}, {"symptoms": 0.7, "history": 0.4, "smoker": 0.3, "age": 0.8, "sex": 0.9},
                cue_scale=1.0, n_coughs=(1, 3), extra={"mirrors": "T2"}),
    DatasetSpec("sim_tb_screen", "cough", "supervised", 75, (2, 2), {"tb": 0.4, "non-tb": 0.6},
                (Device("clinic smartphone", 44100, _CLINIC), Device("clinic smartphone", 16000, _CLINIC)),
                {"wav": 0.9, "flac": 0.1}, _FULL, cue_scale=0.85, extra={"mirrors": "T3"}),
    DatasetSpec("sim_lung_clinic", "lung", "supervised", 50, (2, 4), {"copd": 0.55, "healthy": 0.35, "urti": 0.1},
                (Device("electronic stethoscope A", 4000, _STETH_A), Device("electronic stethoscope B", 44100, _STETH_B)),
                {"wav": 0.7, "wav24": 0.2, "flac": 0.1}, {"symptoms": 0.6, "history": 0.5, "smoker": 0.7, "age": 0.97, "sex": 0.98},
                locations=_ICBHI_LIKE, extra={"mirrors": "T4"}),
    DatasetSpec("sim_covid_unseen", "cough", "zero-shot", 120, (1, 1), {"covid": 0.35, "healthy": 0.65},
                (Device("smartphone", 48000, _PHONE),), {"wav": 0.9, "flac": 0.1}, _FULL, extra={"mirrors": "T5"}),
    DatasetSpec("sim_tb_unseen", "cough", "zero-shot", 60, (2, 2), {"tb": 0.35, "non-tb": 0.65},
                (Device("smartphone", 16000, _CLINIC),), {"wav": 0.85, "ogg": 0.15}, _FULL, cue_scale=0.85,
                extra={"mirrors": "T6"}),
    DatasetSpec("sim_lung_unseen", "lung", "zero-shot", 84, (3, 3),
                {"healthy": 0.38, "copd": 0.16, "asthma": 0.28, "pneumonia": 0.18},
                (Device("electronic stethoscope C", 4000, _STETH_C),), {"wav": 1.0},
                {"symptoms": 0.85, "history": 0.7, "smoker": 0.6, "age": 1.0, "sex": 1.0},
                locations=_KAUH_LIKE, modes=("bell", "diaphragm", "extended"), extra={"mirrors": "T7-T9"}),
)}


@dataclass
class Patient:
    patient_id: str
    diagnosis: str
    severity: float
    cue: float                        # acoustic cue strength in [0, 1] (0 = not expressed)
    age: float | None
    sex: str
    smoker: str
    symptoms: str
    history: str
    voice: Voice
    device: Device
    locations: list[str]


def pick(rng: np.random.Generator, weights: dict):
    """One key of ``weights`` drawn with probability proportional to its value."""
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def class_counts(mix: dict[str, float], n: int, minimum: int) -> dict[str, int]:
    """Patients per diagnosis: proportional (largest remainder), at least ``minimum`` each."""
    names = list(mix)
    share = np.array([mix[k] for k in names], dtype=float)
    share /= share.sum()
    base = np.maximum(np.floor(share * n).astype(int), minimum)
    while base.sum() < n:
        base[int(np.argmax(share * n - base))] += 1
    return dict(zip(names, base.tolist()))


def _phrases(rng: np.random.Generator, probs: dict[str, float], scale: float) -> list[str]:
    return [p for p, q in probs.items() if rng.random() < min(q * scale, 0.95)]


def sample_patient(rng: np.random.Generator, ds: DatasetSpec, pid: str, diagnosis: str) -> Patient:
    """Draw one patient's latent state and reported metadata."""
    d = DISEASES[diagnosis]
    severity = float(rng.beta(2.0, 2.0) if d.positive else rng.beta(1.2, 4.0))
    if rng.random() < d.express:
        mix = 0.5 * severity + 0.5 * rng.random()
        cue = float(np.clip((0.3 + 0.7 * mix) * ds.cue_scale, 0.05, 1.0))
        if not d.positive:
            cue *= 0.6
    else:
        cue = 0.0
    sex = "male" if rng.random() < 0.5 else "female"
    mean, sd, lo, hi = d.age
    age = float(np.clip(round(rng.normal(mean, sd)), lo, hi))
    smoker = "yes" if rng.random() < d.smoker else "no"
    # Symptoms scale with severity; asymptomatic patients say so explicitly ("none").
    asym = rng.random() < d.asymptomatic * (1.5 - severity)
    symptoms = [] if asym else _phrases(rng, d.symptoms, 0.5 + severity)
    history = _phrases(rng, d.history, 1.0)
    if smoker == "yes" and rng.random() < 0.15 and "dry cough" not in symptoms:
        symptoms.append("dry cough")     # smoker's cough: a text cue shared with disease
    rep = ds.report
    f0 = rng.uniform(95, 150) if sex == "male" else rng.uniform(170, 250)
    voice = Voice(f0=float(f0), formants=tuple(float(f * rng.uniform(0.85, 1.15)) for f in (650, 1400, 2600)))
    device = ds.devices[int(rng.choice(len(ds.devices), p=_norm([x.weight for x in ds.devices])))]
    locs = list(rng.permutation(ds.locations)) if ds.locations else []
    return Patient(
        patient_id=pid, diagnosis=diagnosis, severity=severity, cue=cue,
        age=age if rng.random() < rep["age"] else None,
        sex=sex if rng.random() < rep["sex"] else "",
        smoker=smoker if rng.random() < rep["smoker"] else "",
        symptoms=("; ".join(symptoms) or "none") if rng.random() < rep["symptoms"] else "",
        history=("; ".join(history) or "none") if rng.random() < rep["history"] else "",
        voice=voice, device=device, locations=locs,
    )


def _norm(w: list[float]) -> np.ndarray:
    a = np.asarray(w, dtype=float)
    return a / a.sum()


def cough_cues(p: Patient, ds: DatasetSpec, rng: np.random.Generator) -> CoughCues:
    """Acoustic cue strengths of one cough recording of patient ``p``."""
    a = p.cue * rng.uniform(0.75, 1.15) if p.cue else 0.0
    dry = wet = 0.0
    if p.diagnosis == "covid":
        dry = a
    elif p.diagnosis == "tb":
        wet = a
    elif p.cue:  # controls: weak look-alikes (a cold's dry cough, a smoker's wet one)
        if rng.random() < 0.5:
            dry = a
        else:
            wet = a
    return CoughCues(dry=float(min(dry, 1.0)), wet=float(min(wet, 1.0)), n_coughs=ds.n_coughs)


def lung_cues(p: Patient, rng: np.random.Generator) -> LungCues:
    """Breathing pattern and adventitious sounds of one chest recording of patient ``p``."""
    a = min(p.cue * rng.uniform(0.75, 1.15), 1.0) if p.cue else 0.0
    rate = float(np.clip(rng.normal(15, 2.5), 10, 22))
    ie = float(rng.uniform(1.4, 2.2))
    base = dict(rate_bpm=rate, ie_ratio=ie, fine_crackles=float(rng.uniform(0, 0.1)))
    dx = p.diagnosis
    if dx == "copd":
        return LungCues(rate_bpm=rate + 5 * a, ie_ratio=ie + 1.3 * a, wheeze_prob=0.65 * a, wheeze_band=(350, 800),
                        polyphonic=0.2, coarse_crackles=4 * a, fine_crackles=0.5 * a, bronchial=0.1 * a)
    if dx == "asthma":
        return LungCues(rate_bpm=rate + 4 * a, ie_ratio=ie + 1.3 * a, wheeze_prob=0.85 * a, wheeze_band=(400, 1000),
                        polyphonic=0.5, fine_crackles=0.1)
    if dx == "pneumonia":
        return LungCues(rate_bpm=rate + 10 * a, ie_ratio=max(ie - 0.4 * a, 1.1), wheeze_prob=0.05 * a,
                        fine_crackles=6 * a, coarse_crackles=1.0 * a, bronchial=0.5 * a)
    if dx == "urti":
        return LungCues(rate_bpm=rate + 2 * a, ie_ratio=ie, coarse_crackles=1.0 * a, bronchial=0.2 * a)
    if a:  # healthy with a look-alike: an occasional squeak or a few crackles
        if rng.random() < 0.5:
            return LungCues(**base, wheeze_prob=0.3 * a, wheeze_band=(400, 900))
        base["fine_crackles"] = 1.5 * a
    return LungCues(**base)
