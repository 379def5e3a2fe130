"""ICBHI 2017 Respiratory Sound Database (Rocha et al. 2019, Physiol. Meas. 40:035001).

Layout as published::

    ROOT/ICBHI_Challenge_diagnosis.txt                 pid<TAB>diagnosis          (126 patients)
    ROOT/ICBHI_Challenge_demographic_information.txt  pid age sex bmi weight height, NA = missing
    ROOT/ICBHI_challenge_train_test.txt               name<TAB>train|test, CRLF  (921 names)
    ROOT/audio_and_txt_files/{pid}_{idx}_{loc}_{sc|mc}_{device}.wav / .txt

One record per recording present on disk. Quirks handled here:

* the split file lists ``226_1b1_Pl_sc_Meditron``, which was never published, so the
  official split is 539 train / 381 test over 920 recordings;
* patient 223 has NA age and sex: age ``None`` and sex ``""``, never "nan";
* the chest location and the device are read per recording from the file name
  (one patient has up to seven locations), not per patient;
* the cycle annotation (.txt: start, end, crackle, wheeze) is summarised in
  ``extra`` (cycle / crackle / wheeze counts); it is never put in the context,
  because adventitious sounds are close to the label.

The official files are parsed strictly (a malformed line is a :class:`DataError`),
because every recording depends on them. :func:`read_icbhi_official` reads them
without any audio, so the published counts can be checked on the metadata alone.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from respiramfm.data.datasets.common import AdapterResult, first_existing, index_files, read_text
from respiramfm.data.records import Record
from respiramfm.data.templates import render_context
from respiramfm.errors import DataError

DIAGNOSIS_FILE = "ICBHI_Challenge_diagnosis.txt"
DEMOGRAPHIC_FILE = "ICBHI_Challenge_demographic_information.txt"
SPLIT_FILE = "ICBHI_challenge_train_test.txt"
AUDIO_DIRS = ("audio_and_txt_files", "ICBHI_final_database")

#: listed in the official split file but never published as a recording
UNPUBLISHED = frozenset({"226_1b1_Pl_sc_Meditron"})

DIAGNOSES = {
    "copd": "copd", "healthy": "healthy", "urti": "urti", "lrti": "lrti", "asthma": "asthma",
    "pneumonia": "pneumonia", "bronchiectasis": "bronchiectasis", "bronchiolitis": "bronchiolitis",
}

LOCATIONS = {
    "Tc": "trachea",
    "Al": "left anterior chest", "Ar": "right anterior chest",
    "Pl": "left posterior chest", "Pr": "right posterior chest",
    "Ll": "left lateral chest", "Lr": "right lateral chest",
}
DEVICES = ("AKGC417L", "LittC2SE", "Litt3200", "Meditron")
ACQUISITION = {"sc": "sequential/single channel", "mc": "simultaneous/multichannel"}

NAME_RE = re.compile(r"^(\d+)_([0-9a-z]+)_([A-Za-z]{2})_(sc|mc)_([A-Za-z0-9]+)$")


@dataclass
class IcbhiDemographics:
    age: float | None
    sex: str            # 'male' / 'female' / ''
    adult_bmi: float | None
    child_weight: float | None
    child_height: float | None


@dataclass
class IcbhiOfficial:
    """The three official metadata files, parsed (no audio needed)."""

    diagnosis: dict[str, str] = field(default_factory=dict)          # pid -> canonical diagnosis
    demographics: dict[str, IcbhiDemographics] = field(default_factory=dict)
    split: dict[str, str] = field(default_factory=dict)              # recording name -> train/test, as listed

    def recordings(self, drop_unpublished: bool = True) -> list[tuple[str, str, str, str]]:
        """(name, pid, split, diagnosis) per recording of the split file, in file order."""
        out = []
        for name, split in self.split.items():
            if drop_unpublished and name in UNPUBLISHED:
                continue
            pid = name.split("_", 1)[0]
            out.append((name, pid, split, self.diagnosis.get(pid, "")))
        return out

    def counts(self, drop_unpublished: bool = True) -> dict[str, Counter]:
        recs = self.recordings(drop_unpublished)
        return {
            "split": Counter(s for _, _, s, _ in recs),
            "diagnosis": Counter(d for _, _, _, d in recs),
            "patients": Counter(self.diagnosis.values()),
        }


def _lines(path: Path, what: str) -> list[tuple[int, list[str]]]:
    text = read_text(path, what)
    out = []
    for i, line in enumerate(text.splitlines(), start=1):  # splitlines handles the CRLF split file
        if line.strip():
            out.append((i, [c.strip() for c in re.split(r"\t| +", line.strip())]))
    return out


def _na_float(v: str, path: Path, line: int, col: str) -> float | None:
    if v.upper() in ("NA", ""):
        return None
    try:
        return float(v)
    except ValueError:
        raise DataError(f"line {line}: {col} {v!r} is neither a number nor NA", path=path) from None


def read_icbhi_official(root: str | Path) -> IcbhiOfficial:
    """Parse the diagnosis, demographic and train/test files found in ``root``."""
    root = Path(root)
    off = IcbhiOfficial()

    path = root / DIAGNOSIS_FILE
    for line, cols in _lines(path, "ICBHI diagnosis file"):
        if len(cols) != 2 or not cols[0].isdigit():
            raise DataError(f"line {line}: expected 'patient<TAB>diagnosis', got {cols}", path=path)
        diag = DIAGNOSES.get(cols[1].lower())
        if diag is None:
            raise DataError(f"line {line}: unknown diagnosis {cols[1]!r} (known: {sorted(DIAGNOSES)})", path=path)
        if cols[0] in off.diagnosis:
            raise DataError(f"line {line}: patient {cols[0]} listed twice", path=path)
        off.diagnosis[cols[0]] = diag

    path = root / DEMOGRAPHIC_FILE
    for line, cols in _lines(path, "ICBHI demographic file"):
        if not 2 <= len(cols) <= 6 or not cols[0].isdigit():
            raise DataError(f"line {line}: expected 'pid age sex bmi weight height', got {cols}", path=path)
        cols = cols + ["NA"] * (6 - len(cols))
        sex_code = cols[2].upper()
        if sex_code not in ("M", "F", "NA"):
            raise DataError(f"line {line}: sex {cols[2]!r} is not M, F or NA", path=path)
        off.demographics[cols[0]] = IcbhiDemographics(
            age=_na_float(cols[1], path, line, "age"),
            sex={"M": "male", "F": "female"}.get(sex_code, ""),
            adult_bmi=_na_float(cols[3], path, line, "adult BMI"),
            child_weight=_na_float(cols[4], path, line, "child weight"),
            child_height=_na_float(cols[5], path, line, "child height"),
        )

    path = root / SPLIT_FILE
    for line, cols in _lines(path, "ICBHI train/test file"):
        if len(cols) != 2 or cols[1] not in ("train", "test"):
            raise DataError(f"line {line}: expected 'recording<TAB>train|test', got {cols}", path=path)
        if cols[0] in off.split:
            raise DataError(f"line {line}: recording {cols[0]} listed twice", path=path)
        off.split[cols[0]] = cols[1]
    return off


def _cycles(txt: Path) -> dict[str, int] | str:
    """Cycle counts from an annotation file, or a cause string when it is malformed."""
    try:
        text = txt.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"annotation unreadable: {exc}"
    n = crackles = wheezes = 0
    for i, line in enumerate(text.splitlines(), start=1):
        cols = line.split()
        if not cols:
            continue
        if len(cols) != 4 or cols[2] not in ("0", "1") or cols[3] not in ("0", "1"):
            return f"annotation line {i} malformed: {line!r}"
        n += 1
        crackles += cols[2] == "1"
        wheezes += cols[3] == "1"
    return {"cycles": n, "crackle_cycles": crackles, "wheeze_cycles": wheezes}


def load_icbhi(root: str | Path, **_opts) -> AdapterResult:
    """Records for every ICBHI recording found under ``root`` (see the module docstring)."""
    root = Path(root)
    official = read_icbhi_official(root)
    audio_dir = first_existing(root, AUDIO_DIRS, "ICBHI audio folder")
    wavs = index_files(audio_dir, (".wav",))
    res = AdapterResult()

    for name in sorted(n for n in official.split if f"{n}.wav" not in wavs):
        why = ("listed in the official split but never published (known ICBHI quirk)"
               if name in UNPUBLISHED else "listed in the official split; audio file missing")
        res.problem(audio_dir / f"{name}.wav", why)

    for fname in sorted(wavs, key=lambda s: (s.split("_", 1)[0].zfill(6), s)):
        path = wavs[fname]
        name = fname[:-4]
        m = NAME_RE.match(name)
        if not m:
            res.problem(path, "file name does not follow {pid}_{index}_{location}_{sc|mc}_{device}; skipped")
            continue
        pid, idx, loc, acq, device = m.groups()
        if pid not in official.diagnosis:
            res.problem(path, f"patient {pid} is not in {DIAGNOSIS_FILE}; skipped")
            continue
        if loc not in LOCATIONS:
            res.problem(path, f"unknown chest location code {loc!r}; location left unreported")
        if device not in DEVICES:
            res.problem(path, f"unknown device {device!r}; kept as written")
        split = official.split.get(name, "")
        if not split:
            res.problem(path, f"recording not listed in {SPLIT_FILE}; split left unassigned")
        demo = official.demographics.get(pid)
        if demo is None:
            res.problem(path, f"patient {pid} is not in {DEMOGRAPHIC_FILE}; age/sex unreported")
            demo = IcbhiDemographics(None, "", None, None, None)
        extra: dict = {"recording_index": idx, "location_code": loc, "acquisition": ACQUISITION[acq]}
        for key in ("adult_bmi", "child_weight", "child_height"):
            if getattr(demo, key) is not None:
                extra[key] = getattr(demo, key)
        txt = path.with_suffix(".txt")
        if txt.exists():
            cyc = _cycles(txt)
            if isinstance(cyc, str):
                res.problem(txt, cyc)
            else:
                extra.update(cyc)
        if split:
            extra["official_split"] = split
        rec = Record(
            record_id=f"icbhi/{name}", patient_id=f"icbhi/{pid}", dataset="icbhi",
            audio_path=str(path.resolve()), audio_type="lung", diagnosis=official.diagnosis[pid],
            age=demo.age, sex=demo.sex, location=LOCATIONS.get(loc, ""), device=device,
            split=split, extra=extra,
        )
        rec.context = render_context(rec)
        res.records.append(rec)
    return res
