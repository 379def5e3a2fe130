"""The SIMULATED cohort: ``respiramfm prepare simulated --out DIR``.

Writes a synthetic population whose recordings and symptom texts carry
disease cues (see :mod:`respiramfm.data.simulate_population` for the disease
model and :mod:`respiramfm.data.simulate_audio` for the acoustics), so that the
whole pipeline, zero-shot tasks included, runs offline in minutes. It is
**no evidence about real patients**, and it says so everywhere: dataset names
start with ``sim_``, every record's ``extra`` and every task carry
``simulated: true``, and a ``SIMULATED.txt`` note lies beside the manifest.

Output layout (paths in the manifest are relative to it)::

    DIR/manifest.csv        records (respiramfm.data.records)
    DIR/tasks.yaml          SIM-T1..SIM-T9 (respiramfm.data.tasks.load_tasks_yaml)
    DIR/SIMULATED.txt       what this is, how it was made, counts
    DIR/audio/<dataset>/<record_id>.{wav,flac,ogg}

The output is a pure function of the configuration: the same seed gives the
same bytes. Each recording draws from its own generator seeded by
(seed, dataset, patient, recording), so a rerun after an interruption resumes
dataset by dataset and still produces identical files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from respiramfm.data.records import Record, read_manifest, write_manifest
from respiramfm.data.simulate_audio import OPUS_RATES, apply_channel, encode_audio, render_cough, render_lung
from respiramfm.data.simulate_population import (
    DATASETS, DatasetSpec, Patient, class_counts, cough_cues, lung_cues, pick, sample_patient,
)
from respiramfm.data.splits import check_no_leakage
from respiramfm.data.tasks import Task, dump_tasks_yaml
from respiramfm.data.templates import render_context
from respiramfm.errors import ConfigError, DataError
from respiramfm.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_bytes

GENERATOR_VERSION = "respiramfm-sim-1"
QUICK_SCALE = 0.25
STATE_FILE = ".simulate.json"
MIN_PER_CLASS = {"supervised": 5, "zero-shot": 3}   # enough for every split to hold every class


@dataclass
class SimConfig:
    """What to simulate. ``None`` fields take the (quick or full) defaults."""

    seed: int = 0
    n_patients: int | None = None               # per dataset (each class keeps a small minimum)
    recordings_per_patient: int | None = None   # overrides each dataset's own range / modes
    clip_seconds: tuple[float, float] | None = None   # default (3, 8); quick (2.5, 5)
    quick: bool = False                         # ~300 recordings instead of ~1,200
    datasets: tuple[str, ...] | None = None     # subset of DATASETS (None = all)
    out_dir: str = ""                           # used when simulate_cohort() gets no out_dir
    overwrite: bool = False                     # replace a cohort made with other settings

    def clip_range(self) -> tuple[float, float]:
        if self.clip_seconds is not None:
            return float(self.clip_seconds[0]), float(self.clip_seconds[1])
        return (2.5, 5.0) if self.quick else (3.0, 8.0)

    def dataset_names(self) -> list[str]:
        return list(self.datasets) if self.datasets else list(DATASETS)

    def fingerprint(self) -> str:
        """Hash of everything that changes the output (not where it goes)."""
        d = {"version": GENERATOR_VERSION, "seed": int(self.seed), "n_patients": self.n_patients,
             "recordings_per_patient": self.recordings_per_patient, "clip_seconds": list(self.clip_range()),
             "quick": bool(self.quick), "datasets": self.dataset_names()}
        return sha256_bytes(json.dumps(d, sort_keys=True).encode())[:16]


def validate(cfg: SimConfig) -> None:
    unknown = [d for d in cfg.dataset_names() if d not in DATASETS]
    if unknown:
        raise ConfigError(f"unknown simulated dataset(s) {unknown}; known: {sorted(DATASETS)}")
    lo, hi = cfg.clip_range()
    if not (1.0 <= lo <= hi <= 30.0):
        raise ConfigError(f"clip_seconds must satisfy 1 <= min <= max <= 30, got ({lo}, {hi})")
    if cfg.n_patients is not None and not 1 <= cfg.n_patients <= 100_000:
        raise ConfigError(f"n_patients must be between 1 and 100000, got {cfg.n_patients}")
    if cfg.recordings_per_patient is not None and not 1 <= cfg.recordings_per_patient <= 20:
        raise ConfigError(f"recordings_per_patient must be between 1 and 20, got {cfg.recordings_per_patient}")


# --------------------------------------------------------------------------- planning


def _key(name: str) -> int:
    return zlib.crc32(name.encode())


def _splits(rng: np.random.Generator, patients: list[Patient], role: str) -> dict[str, str]:
    """Patient-level, diagnosis-stratified 60/20/20 split; zero-shot sets are test-only.

    Unlike a proportional deal, every diagnosis with 3+ patients gets at least one
    validation and one test patient, so every task can be validated and tested
    even in the small ``--quick`` cohort.
    """
    if role == "zero-shot":
        return {p.patient_id: "test" for p in patients}
    out: dict[str, str] = {}
    for dx in sorted({p.diagnosis for p in patients}):
        ids = [p.patient_id for p in patients if p.diagnosis == dx]
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n_test = max(1, round(0.2 * len(ids))) if len(ids) >= 3 else 0
        n_val = max(1, round(0.2 * len(ids))) if len(ids) >= 3 else 0
        for j, pid in enumerate(ids):
            out[pid] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
    return out


def plan_patients(ds: DatasetSpec, cfg: SimConfig) -> tuple[list[Patient], dict[str, str]]:
    """The patients of one dataset and their splits (cheap: no audio)."""
    k = _key(ds.name)
    n = cfg.n_patients or (max(1, round(ds.n_patients * QUICK_SCALE)) if cfg.quick else ds.n_patients)
    counts = class_counts(ds.mix, n, MIN_PER_CLASS[ds.role])
    diagnoses = [dx for dx, c in counts.items() for _ in range(c)]
    order = np.random.default_rng([cfg.seed, k, 0]).permutation(len(diagnoses))
    patients = [
        sample_patient(np.random.default_rng([cfg.seed, k, 1, i]), ds, f"{ds.name}/p{i + 1:04d}", diagnoses[j])
        for i, j in enumerate(order)
    ]
    return patients, _splits(np.random.default_rng([cfg.seed, k, 2]), patients, ds.role)


def _render(ds: DatasetSpec, p: Patient, rng: np.random.Generator, sr: int, seconds: float, mode: str):
    if ds.audio_type == "cough":
        cues = cough_cues(p, ds, rng)
        clean, info = render_cough(rng, sr, seconds, p.voice, cues)
        marks = [m for m, on in (("dry_cough", cues.dry > 0), ("wet_cough", cues.wet > 0),
                                 ("rattle", info["n_rattles"] > 0)) if on]
    else:
        cues = lung_cues(p, rng)
        clean, info = render_lung(rng, sr, seconds, cues, heart_level=rng.uniform(*p.device.channel.heart_level))
        marks = [m for m, on in (("wheeze", info["n_wheezes"] > 0), ("fine_crackle", info["n_fine_crackles"] > 0),
                                 ("coarse_crackle", info["n_coarse_crackles"] > 0), ("tachypnoea", cues.rate_bpm > 22),
                                 ("prolonged_expiration", cues.ie_ratio > 2.6),
                                 ("bronchial_breathing", cues.bronchial >= 0.2)) if on]
        info = {**info, "rate_bpm": round(cues.rate_bpm, 2), "ie_ratio": round(cues.ie_ratio, 2)}
    audio, ch = apply_channel(rng, clean, sr, p.device.channel, mode)
    return audio, marks, {**info, **ch}


def simulate_dataset(ds: DatasetSpec, cfg: SimConfig, out: Path) -> list[Record]:
    """Render every recording of ``ds`` under ``out/audio/<name>/`` and return its records."""
    k = _key(ds.name)
    lo, hi = cfg.clip_range()
    patients, splits = plan_patients(ds, cfg)
    records: list[Record] = []
    for i, p in enumerate(patients):
        prng = np.random.default_rng([cfg.seed, k, 3, i])
        n_rec = cfg.recordings_per_patient or (len(ds.modes) or int(prng.integers(ds.recordings[0], ds.recordings[1] + 1)))
        for r in range(n_rec):
            rng = np.random.default_rng([cfg.seed, k, 4, i, r])
            seconds = round(float(rng.uniform(lo, hi)), 2)
            fmt = pick(rng, ds.formats)
            if fmt == "ogg" and p.device.sr not in OPUS_RATES:
                fmt = "flac"
            mode = ds.modes[r % len(ds.modes)] if ds.modes else ""
            # ICBHI-like sets move the stethoscope between recordings; KAUH-like ones change the filter mode.
            location = "" if not p.locations else p.locations[0 if ds.modes else r % len(p.locations)]
            local = f"p{i + 1:04d}-r{r + 1}"
            rel = Path("audio") / ds.name / f"{local}.{'wav' if fmt.startswith('wav') else fmt}"
            audio, marks, info = _render(ds, p, rng, p.device.sr, seconds, mode)
            atomic_write_bytes(out / rel, encode_audio(audio, p.device.sr, fmt))
            extra = {"simulated": True, "sample_rate": p.device.sr, "format": fmt, "duration_s": seconds,
                     "sim_severity": round(p.severity, 3), "sim_cue": round(p.cue, 3),
                     "sim_biomarkers": marks, "sim_info": info}
            if mode:
                extra["mode"] = mode
            rec = Record(
                record_id=f"{ds.name}/{local}", patient_id=p.patient_id, dataset=ds.name, audio_path=rel.as_posix(),
                audio_type=ds.audio_type, diagnosis=p.diagnosis, age=p.age, sex=p.sex, symptoms=p.symptoms,
                medical_history=p.history, smoker=p.smoker, location=location,
                device=f"{p.device.name} ({mode} mode)" if mode else p.device.name,
                split=splits[p.patient_id], extra=extra,
            )
            rec.context = render_context(rec)
            records.append(rec)
    return records


# --------------------------------------------------------------------------- tasks


# diagnosis -> (Task.disease, prompt phrase, negative class name, subject), worded as the paper tasks T1-T9
_DISEASE = {
    "covid": ("COVID19", "COVID-19", "non-COVID19", "participant"),
    "tb": ("TB", "Tuberculosis (TB)", "Non-TB", "participant"),
    "copd": ("COPD", "Chronic obstructive pulmonary disease (COPD)", "healthy", "person"),
    "asthma": ("asthma", "asthma", "healthy", "person"),
    "pneumonia": ("pneumonia", "pneumonia", "healthy", "person"),
}
_TASKS = (  # name, dataset, disease, negatives, unseen disease, mirrors, description
    ("SIM-T1", "sim_covid_phone", "covid", ("non-covid",), False, "T1",
     "This simulated data comes from synthetic cough recordings made on smartphones in a COVID-19 testing study."),
    ("SIM-T2", "sim_covid_crowd", "covid", ("healthy",), False, "T2",
     "This simulated data comes from synthetic crowdsourced cough recordings made in web browsers and phone apps."),
    ("SIM-T3", "sim_tb_screen", "tb", ("non-tb",), False, "T3",
     "This simulated data comes from synthetic cough recordings made at a tuberculosis screening clinic."),
    ("SIM-T4", "sim_lung_clinic", "copd", ("healthy",), False, "T4",
     "This simulated data comes from synthetic lung sounds recorded at several chest locations with electronic stethoscopes."),
    ("SIM-T5", "sim_covid_unseen", "covid", ("healthy",), False, "T5",
     "This simulated data comes from a second synthetic smartphone cough collection for COVID-19."),
    ("SIM-T6", "sim_tb_unseen", "tb", ("non-tb",), False, "T6",
     "This simulated data comes from a second synthetic tuberculosis cough screening study."),
    ("SIM-T7", "sim_lung_unseen", "copd", ("healthy",), False, "T7",
     "This simulated data comes from synthetic lung sounds recorded from the chest wall using an electronic stethoscope."),
    ("SIM-T8", "sim_lung_unseen", "asthma", ("healthy",), True, "T8",
     "This simulated data comes from synthetic lung sounds recorded from the chest wall using an electronic stethoscope."),
    ("SIM-T9", "sim_lung_unseen", "pneumonia", ("healthy",), True, "T9",
     "This simulated data comes from synthetic lung sounds recorded from the chest wall using an electronic stethoscope."),
)


def simulated_tasks(datasets: list[str] | None = None) -> list[Task]:
    """SIM-T1..SIM-T9 (mirroring the paper's T1-T9 roles), for the datasets present."""
    keep = set(datasets or DATASETS)
    out = []
    for name, dataset, diagnosis, negative, unseen, mirrors, description in _TASKS:
        if dataset not in keep:
            continue
        disease, phrase, neg, subject = _DISEASE[diagnosis]
        ds = DATASETS[dataset]
        out.append(Task(
            name=name, dataset=dataset, disease=disease, disease_phrase=phrase, positive=(diagnosis,),
            negative=negative, audio_type=ds.audio_type, role=ds.role, description=description,
            unseen_disease=unseen, simulated=True,
            extra={"negative_class": neg, "subject": subject, "mirrors": mirrors, "simulated": True},
        ))
    return out


# --------------------------------------------------------------------------- cohort


def _note(cfg: SimConfig, records: list[Record], tasks: list[Task]) -> str:
    lines = [
        "SIMULATED DATA - NOT REAL PATIENTS",
        "",
        "Every recording and every patient in this folder was generated by respiramfm's",
        "simulator (respiramfm.data.simulate). Diseases are expressed through synthetic",
        "acoustic cues (crackles, wheezes, cough shapes, breathing patterns) and synthetic,",
        "correlated symptom reports. Results on this cohort test the software only: they are",
        "no evidence about any real patient, disease, dataset or clinical use.",
        "",
        f"generator: {GENERATOR_VERSION}   fingerprint: {cfg.fingerprint()}",
        f"seed: {cfg.seed}   quick: {cfg.quick}   clip seconds: {cfg.clip_range()}",
        f"recordings: {len(records)}   patients: {len({r.patient_id for r in records})}",
        "",
    ]
    for name in cfg.dataset_names():
        rs = [r for r in records if r.dataset == name]
        dx = Counter(r.diagnosis for r in rs)
        sp = Counter(r.split for r in rs)
        lines.append(f"{name} ({DATASETS[name].role}, {DATASETS[name].audio_type}): {len(rs)} recordings; "
                     + ", ".join(f"{k} {v}" for k, v in sorted(dx.items())) + "; splits "
                     + ", ".join(f"{k} {v}" for k, v in sorted(sp.items())))
    lines += ["", "tasks (tasks.yaml):"]
    lines += [f"  {t.name} [{t.role}{', unseen disease' if t.unseen_disease else ''}] {t.dataset}: "
              f"{t.disease} ({', '.join(t.positive)} vs {', '.join(t.negative)})" for t in tasks]
    return "\n".join(lines) + "\n"


def simulate_cohort(out_dir=None, cfg: SimConfig | None = None) -> Path:
    """Write the simulated cohort under ``out_dir`` and return the manifest's path.

    Re-running with the same settings is a no-op once complete, and resumes an
    interrupted run dataset by dataset. A folder made with other settings is
    refused unless ``cfg.overwrite``; a non-empty folder that is not a simulated
    cohort is always refused (nothing of the user's is deleted).
    """
    cfg = cfg or SimConfig()
    validate(cfg)
    if out_dir is None and not cfg.out_dir:
        raise ConfigError("simulate_cohort needs an output directory")
    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise DataError("output path exists and is not a directory", path=out)
    state_path, manifest = out / STATE_FILE, out / "manifest.csv"
    fp = cfg.fingerprint()
    if out.is_dir() and any(out.iterdir()):
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DataError("output directory is not empty and holds no simulated cohort; choose an empty "
                            "or new directory", path=out) from None
        if state.get("fingerprint") != fp:
            if not cfg.overwrite:
                raise ConfigError(f"holds a simulated cohort made with other settings ({state.get('fingerprint')} "
                                  f"!= {fp}); pass --overwrite to replace it", path=out)
            for name in ("audio", ".progress"):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in ("manifest.csv", "tasks.yaml", "SIMULATED.txt", STATE_FILE):
                (out / name).unlink(missing_ok=True)
        elif state.get("complete") and manifest.is_file():
            return manifest
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out_dir", "overwrite")}
    atomic_write_json(state_path, {"fingerprint": fp, "version": GENERATOR_VERSION, "config": settings, "complete": False})
    records: list[Record] = []
    for name in cfg.dataset_names():
        done = out / ".progress" / f"{name}.csv"   # a finished dataset's records
        if done.is_file():
            part = read_manifest(done)
            if all((out / r.audio_path).is_file() for r in part):
                records += part
                continue
        part = simulate_dataset(DATASETS[name], cfg, out)
        write_manifest(part, done)
        records += part
    check_no_leakage(records)
    tasks = simulated_tasks(cfg.dataset_names())
    write_manifest(records, manifest)
    dump_tasks_yaml(tasks, out / "tasks.yaml")
    atomic_write_text(out / "SIMULATED.txt", _note(cfg, records, tasks))
    atomic_write_json(state_path, {"fingerprint": fp, "version": GENERATOR_VERSION, "config": settings, "complete": True})
    return manifest


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory (created; must be new, empty or a previous cohort)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes (default 0)")
    parser.add_argument("--n-patients", type=int, default=None, help="patients per dataset (default: each dataset's own size)")
    parser.add_argument("--recordings-per-patient", type=int, default=None, help="override recordings per patient")
    parser.add_argument("--clip-seconds", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="clip length range in seconds (default 3 8; quick 2.5 5)")
    parser.add_argument("--datasets", default=None,
                        help=f"comma-separated subset of: {','.join(DATASETS)}")
    parser.add_argument("--quick", action="store_true", help="~300 recordings instead of ~1,200")
    parser.add_argument("--overwrite", action="store_true", help="replace a cohort made with other settings")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    datasets = getattr(args, "datasets", None)
    if isinstance(datasets, str):
        datasets = [d.strip() for d in datasets.split(",") if d.strip()]
    clip = getattr(args, "clip_seconds", None)
    return SimConfig(
        seed=int(getattr(args, "seed", 0) or 0), n_patients=getattr(args, "n_patients", None),
        recordings_per_patient=getattr(args, "recordings_per_patient", None),
        clip_seconds=tuple(clip) if clip else None, quick=bool(getattr(args, "quick", False)),
        datasets=tuple(datasets) if datasets else None, out_dir=str(args.out),
        overwrite=bool(getattr(args, "overwrite", False)),
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    manifest = simulate_cohort(args.out, cfg)
    print((manifest.parent / "SIMULATED.txt").read_text(encoding="utf-8"), end="")
    print(f"manifest: {manifest}\ntasks: {manifest.parent / 'tasks.yaml'}")
    return 0
