"""ICBHI 2017 as respiratory-cycle segments: one WAV per annotated cycle, sorted by sound class.

Layout read (a public redistribution of the ICBHI recordings cut at the official cycle
boundaries, plus the official label files)::

    ROOT/Crack/crack<n>__<recording>_s<cycle>_.wav      cycles annotated with crackles
    ROOT/Wheeze/wheeze<n>__<recording>_s<cycle>_.wav    cycles annotated with wheezes
    ROOT/Normal/normal_<n>__<recording>_s<cycle>_.wav   cycles with neither
    ROOT/patient_diagnosis.csv                           ID,CLASS (one row per patient)
    ROOT/demographic_info.txt                            pid age sex adult-BMI child-weight child-height
    ROOT/audio_and_txt_files/<recording>.txt             the official cycle annotations (optional)

``<recording>`` is the official recording name ``{pid}_{index}_{location}_{sc|mc}_{device}``,
so patient, chest location and device come from it exactly as in the full-recording
layout (:mod:`respiramfm.data.datasets.icbhi`); ``<cycle>`` is the 1-based line of the
recording's annotation file. One record per segment:

* ``record_id`` ``icbhi/<recording>_s<cycle>``, ``patient_id`` ``icbhi/<pid>``: every
  segment of a patient shares the patient id, so patient-level splits and
  cross-validation keep them together;
* the segment's sound class (crackle / wheeze / normal) and the cycle's start and end
  (when the annotation file is there) go into ``extra`` only: an auscultation finding is
  close to the label and never enters the context text;
* the official train/test split is not part of this layout: splits are left unassigned
  for ``prepare`` to assign at patient level.

Files whose names do not parse, patients missing from the diagnosis file and duplicate
segments (the same recording and cycle in two folders) are reported and skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

from respiramfm.data.datasets.common import AdapterResult, index_files, parse_age, read_csv, read_text
from respiramfm.data.datasets.icbhi import (
    ACQUISITION, DEVICES, DIAGNOSES, DIAGNOSIS_FILE, LOCATIONS, NAME_RE, load_icbhi,
)
from respiramfm.data.records import Record
from respiramfm.data.templates import render_context
from respiramfm.errors import DataError

CLASS_DIRS = {"Crack": "crackle", "Wheeze": "wheeze", "Normal": "normal"}
DIAGNOSIS_CSV = "patient_diagnosis.csv"
DEMOGRAPHIC_TXT = "demographic_info.txt"
ANNOTATION_DIR = "audio_and_txt_files"

SEGMENT_RE = re.compile(r"^(crack|wheeze|normal)_?(\d+)__(.+)_s(\d+)_?$", re.IGNORECASE)


def is_segment_layout(root: str | Path) -> bool:
    """True when ``root`` holds at least one class folder and the diagnosis CSV of this layout."""
    root = Path(root)
    return (root / DIAGNOSIS_CSV).is_file() and any((root / d).is_dir() for d in CLASS_DIRS)


def parse_segment_name(stem: str) -> dict | str:
    """Fields of a segment file name stem, or a cause string when it does not parse."""
    m = SEGMENT_RE.match(stem)
    if not m:
        return "file name does not follow <class><n>__<recording>_s<cycle>_"
    cls, n, recording, cycle = m.groups()
    rm = NAME_RE.match(recording)
    if not rm:
        return f"recording name {recording!r} does not follow {{pid}}_{{index}}_{{location}}_{{sc|mc}}_{{device}}"
    pid, idx, loc, acq, device = rm.groups()
    return {"class": cls.lower(), "n": int(n), "recording": recording, "cycle": int(cycle), "pid": pid,
            "recording_index": idx, "location_code": loc, "acquisition": acq, "device": device}


def read_diagnoses(path: Path) -> dict[str, str]:
    """pid -> canonical diagnosis from ``patient_diagnosis.csv`` (ID,CLASS); strict."""
    table = read_csv(path, required=("ID", "CLASS"), what="ICBHI patient diagnosis CSV")
    if table.bad_rows:
        raise DataError(table.bad_rows[0][1], path=path)
    out: dict[str, str] = {}
    for line, row in table.rows:
        pid, raw = row["ID"].strip(), row["CLASS"].strip()
        diag = DIAGNOSES.get(raw.lower())
        if not pid.isdigit():
            raise DataError(f"line {line}: patient id {pid!r} is not a number", path=path)
        if diag is None:
            raise DataError(f"line {line}: unknown diagnosis {raw!r} (known: {sorted(DIAGNOSES)})", path=path)
        if pid in out:
            raise DataError(f"line {line}: patient {pid} listed twice", path=path)
        out[pid] = diag
    return out


def read_demographics(path: Path) -> dict[str, dict]:
    """pid -> {age, sex, adult_bmi, child_weight, child_height} from the space-separated file."""
    out: dict[str, dict] = {}
    for line, raw in enumerate(read_text(path, "ICBHI demographic file").splitlines(), start=1):
        cols = raw.split()
        if not cols:
            continue
        if not cols[0].isdigit() or len(cols) > 6:
            raise DataError(f"line {line}: expected 'pid age sex bmi weight height', got {cols}", path=path)
        cols = cols + ["NA"] * (6 - len(cols))
        sex = {"M": "male", "F": "female"}.get(cols[2].upper(), "")
        nums = {}
        for key, v in zip(("adult_bmi", "child_weight", "child_height"), cols[3:6]):
            try:
                nums[key] = float(v)
            except ValueError:
                pass
        out[cols[0]] = {"age": parse_age(cols[1]), "sex": sex, **nums}
    return out


def _cycle_bounds(annotation_dir: Path, cache: dict, recording: str, cycle: int) -> tuple[float, float] | None:
    """(start, end) seconds of the cycle's annotation line, when the annotation file has it."""
    if recording not in cache:
        lines = []
        path = annotation_dir / f"{recording}.txt"
        if path.is_file():
            try:
                lines = [ln.split() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except (OSError, UnicodeDecodeError):
                lines = []
        cache[recording] = lines
    lines = cache[recording]
    if 1 <= cycle <= len(lines) and len(lines[cycle - 1]) >= 2:
        try:
            return float(lines[cycle - 1][0]), float(lines[cycle - 1][1])
        except ValueError:
            return None
    return None


def load_icbhi_segments(root: str | Path, **_opts) -> AdapterResult:
    """Records for every cycle segment under ``root`` (see the module docstring)."""
    root = Path(root)
    diagnoses = read_diagnoses(root / DIAGNOSIS_CSV)
    demo_path = root / DEMOGRAPHIC_TXT
    res = AdapterResult()
    demographics = read_demographics(demo_path) if demo_path.is_file() else {}
    if not demographics:
        res.problem(demo_path, "demographic file absent or empty; age and sex unreported")
    annotations, bounds_cache = root / ANNOTATION_DIR, {}
    seen: dict[str, Path] = {}
    for folder, sound in CLASS_DIRS.items():
        files = index_files(root / folder, (".wav",))
        for fname in sorted(files):
            path = files[fname]
            parsed = parse_segment_name(Path(fname).stem)
            if isinstance(parsed, str):
                res.problem(path, f"{parsed}; skipped")
                continue
            pid = parsed["pid"]
            if pid not in diagnoses:
                res.problem(path, f"patient {pid} is not in {DIAGNOSIS_CSV}; skipped")
                continue
            rid = f"icbhi/{parsed['recording']}_s{parsed['cycle']}"
            if rid in seen:
                res.problem(path, f"cycle {parsed['cycle']} of {parsed['recording']} already read from {seen[rid]}; skipped")
                continue
            seen[rid] = path
            loc, device = parsed["location_code"], parsed["device"]
            if loc not in LOCATIONS:
                res.problem(path, f"unknown chest location code {loc!r}; location left unreported")
            if device not in DEVICES:
                res.problem(path, f"unknown device {device!r}; kept as written")
            demo = demographics.get(pid, {})
            if demographics and not demo:
                res.problem(path, f"patient {pid} is not in {DEMOGRAPHIC_TXT}; age/sex unreported")
            extra = {"layout": "cycle-segments", "recording": parsed["recording"], "cycle": parsed["cycle"],
                     "segment_class": sound, "recording_index": parsed["recording_index"],
                     "location_code": loc, "acquisition": ACQUISITION[parsed["acquisition"]]}
            extra.update({k: v for k, v in demo.items() if k not in ("age", "sex")})
            bounds = _cycle_bounds(annotations, bounds_cache, parsed["recording"], parsed["cycle"])
            if bounds is not None:
                extra["cycle_start_s"], extra["cycle_end_s"] = bounds
            rec = Record(
                record_id=rid, patient_id=f"icbhi/{pid}", dataset="icbhi", audio_path=str(path.resolve()),
                audio_type="lung", diagnosis=diagnoses[pid], age=demo.get("age"), sex=demo.get("sex", ""),
                location=LOCATIONS.get(loc, ""), device=device, extra=extra,
            )
            rec.context = render_context(rec)
            res.records.append(rec)
    if not seen:
        raise DataError(f"no segment WAVs found in {sorted(CLASS_DIRS)}", path=root)
    return res


def load_icbhi_auto(root: str | Path, **opts) -> AdapterResult:
    """The official full-recording layout when its diagnosis file is there, else the segment layout."""
    root = Path(root)
    if not (root / DIAGNOSIS_FILE).is_file() and is_segment_layout(root):
        return load_icbhi_segments(root, **opts)
    return load_icbhi(root, **opts)
