"""KAUH lung-sound dataset (Fraiwan et al., Mendeley Data doi 10.17632/jwyy9np4gv, CC BY 4.0).

Layout as published::

    ROOT/AudioFiles/{B|D|E}P{n}_{diagnosis},{sound type},{location},{age},{M|F}.wav
    ROOT/Data annotation.xlsx          one row per subject n (optional, only cross-checked)

Each subject is recorded three times, once per stethoscope filter mode (B, D, E:
bell / diaphragm / extended, names unverified), so the three files of ``P{n}`` are
one patient, ``kauh/P{n}``: splits and cross-validation must group them.

**File names are the truth per recording.** The spreadsheet is read (openpyxl) only
to report where it disagrees; its locations differ from the file names for several
subjects (2-3, 4-7, 26), which the report lists.

Normalisation of the file-name fields:

* diagnosis: case, repeated/trailing spaces and the "Plueral" misspelling are fixed;
  "N" becomes "healthy"; BRON is kept as the dataset's own abbreviation "bron"
  (bronchitis or bronchiectasis: the publishers do not expand it in the files);
* **comorbid labels** ("Heart Failure + COPD", "Asthma and lung fibrosis") become an
  explicit combined string, ``"heart failure + copd"``, ``"asthma + lung fibrosis"``.
  Tasks match diagnoses exactly, so T7 (COPD), T8 (asthma) and T9 (pneumonia) use only
  the single-disease recordings and leave the comorbid ones out of both classes,
  which reproduces the paper's T7 size (27 COPD + 105 normal = 132);
* location: spaces removed, then "PLR" -> "PRL" (as RespLLM does; the sheet has
  "P R L" for those subjects) and "PLLR" -> "PLL" (the sheet has "P L L"), then
  A/P + L/R + U/M/L decoded to e.g. "posterior left lower". A bare "P" decodes
  to "posterior". The raw code stays in ``extra['location_code']``;
* sound type (I, E, W, C, N, Crep, B) is decoded into ``extra`` only: it is an
  auscultation finding close to the label, so it never enters the context.
"""

from __future__ import annotations

import re
from pathlib import Path

from respiramfm.data.datasets.common import (
    AdapterResult, clean, index_files, parse_age, parse_sex, require_dir,
)
from respiramfm.data.records import Record
from respiramfm.data.templates import render_context

AUDIO_DIR = "AudioFiles"
SHEET = "Data annotation.xlsx"
FILTERS = {"B": "bell", "D": "diaphragm", "E": "extended"}

#: single diagnoses as spelled (lower-cased, spaces collapsed) -> canonical
DIAGNOSES = {
    "n": "healthy", "normal": "healthy",
    "asthma": "asthma", "copd": "copd", "pneumonia": "pneumonia",
    "heart failure": "heart failure", "lung fibrosis": "lung fibrosis",
    "plueral effusion": "pleural effusion", "pleural effusion": "pleural effusion",
    "bron": "bron",
}
SOUNDS = {"I": "inspiratory", "E": "expiratory", "W": "wheezes", "C": "crackles", "N": "normal",
          "CREP": "crepitations", "B": "bronchial", "BRONCHIAL": "bronchial"}
_SIDE1 = {"P": "posterior", "A": "anterior"}
_SIDE2 = {"L": "left", "R": "right"}
_LEVEL = {"U": "upper", "M": "middle", "L": "lower"}
_LOCATION_FIXES = {"PLR": "PRL", "PLLR": "PLL"}

NAME_RE = re.compile(r"^([BDE])P(\d+)_(.+)$", re.IGNORECASE)


def normalise_diagnosis(raw: str) -> str | None:
    """Canonical diagnosis for a KAUH spelling, or ``None`` when a part is unknown."""
    text = clean(raw).lower()
    parts = [clean(p) for p in re.split(r"\s*\+\s*|\s+and\s+", text) if clean(p)]
    if not parts:
        return None
    out = []
    for p in parts:
        canon = DIAGNOSES.get(p)
        if canon is None:
            return None
        out.append(canon)
    return " + ".join(out)


def normalise_location(raw: str) -> tuple[str, str]:
    """(code, phrase) for a KAUH location; phrase is '' when the code cannot be decoded."""
    code = re.sub(r"\s+", "", raw or "").upper()
    code = _LOCATION_FIXES.get(code, code)
    maps = (_SIDE1, _SIDE2, _LEVEL)
    if not code or len(code) > 3:
        return code, ""
    words = []
    for ch, m in zip(code, maps):
        if ch not in m:
            return code, ""
        words.append(m[ch])
    return code, " ".join(words)


def decode_sounds(raw: str) -> list[str]:
    return [SOUNDS.get(tok.upper(), tok.lower()) for tok in clean(raw).split(" ") if tok]


def parse_name(stem: str) -> dict | str:
    """Fields of a KAUH file name stem, or a cause string when it does not parse."""
    m = NAME_RE.match(stem)
    if not m:
        return "file name does not start with {B|D|E}P{n}_"
    filt, num, rest = m.group(1).upper(), int(m.group(2)), m.group(3)
    fields = rest.split(",")
    if len(fields) != 5:
        return f"expected 5 comma-separated fields after P{num}_ (diagnosis,sound,location,age,sex), got {len(fields)}"
    diag_raw, sound_raw, loc_raw, age_raw, sex_raw = fields
    return {"filter": filt, "subject": num, "diagnosis_raw": diag_raw, "sound_raw": sound_raw,
            "location_raw": loc_raw, "age_raw": age_raw, "sex_raw": sex_raw}


def read_sheet(path: Path) -> dict[int, dict[str, str]] | str:
    """Subject n -> sheet row (age, gender, location, sound, diagnosis), or a cause string."""
    try:
        import openpyxl

        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many types for a damaged workbook
        return f"annotation sheet unreadable ({type(exc).__name__}: {exc})"
    try:
        ws = wb.worksheets[0]
        out: dict[int, dict[str, str]] = {}
        for i, row in enumerate(ws.iter_rows(min_row=2, max_col=5, values_only=True), start=1):
            if row is None or all(v is None for v in row):
                continue
            age, gender, loc, sound, diag = (("" if v is None else str(v)) for v in row)
            out[i] = {"age": age, "gender": gender, "location": loc, "sound": sound, "diagnosis": diag}
        return out
    finally:
        wb.close()


def load_kauh(root: str | Path, **_opts) -> AdapterResult:
    """Records for every KAUH recording under ``ROOT/AudioFiles`` (see the module docstring)."""
    root = Path(root)
    audio_dir = require_dir(root / AUDIO_DIR, "KAUH AudioFiles folder")
    res = AdapterResult()
    sheet_path = root / SHEET
    sheet = read_sheet(sheet_path) if sheet_path.exists() else f"{SHEET} absent; file names used alone"
    if isinstance(sheet, str):
        res.problem(sheet_path, sheet)
        sheet = {}

    files = index_files(audio_dir, (".wav",))

    def order(name: str):
        m = NAME_RE.match(name)
        return (int(m.group(2)), m.group(1).upper()) if m else (10**9, name)

    for fname in sorted(files, key=order):
        path = files[fname]
        parsed = parse_name(Path(fname).stem)
        if isinstance(parsed, str):
            res.problem(path, f"{parsed}; skipped")
            continue
        diagnosis = normalise_diagnosis(parsed["diagnosis_raw"])
        if diagnosis is None:
            res.problem(path, f"unknown diagnosis {parsed['diagnosis_raw']!r}; skipped")
            continue
        code, location = normalise_location(parsed["location_raw"])
        if not location:
            res.problem(path, f"location {parsed['location_raw']!r} cannot be decoded; left unreported")
        age = parse_age(parsed["age_raw"])
        if age is None:
            res.problem(path, f"age {parsed['age_raw']!r} is not a number; left unreported")
        sex, other = parse_sex(parsed["sex_raw"])
        if not sex:
            res.problem(path, f"sex {parsed['sex_raw']!r} is not M or F; left unreported")
        n, filt = parsed["subject"], parsed["filter"]
        extra = {
            "filter": FILTERS[filt], "subject": n, "diagnosis_raw": parsed["diagnosis_raw"],
            "sound_type": clean(parsed["sound_raw"]), "sounds": decode_sounds(parsed["sound_raw"]),
            "location_code": code, "location_raw": clean(parsed["location_raw"]),
        }
        if other:
            extra["gender_text"] = other
        row = sheet.get(n)
        if row is not None:
            diffs = []
            if normalise_diagnosis(row["diagnosis"]) != diagnosis:
                diffs.append(f"diagnosis {row['diagnosis']!r}")
            if normalise_location(row["location"])[0] != code:
                diffs.append(f"location {row['location']!r}")
            if parse_age(row["age"]) != age:
                diffs.append(f"age {row['age']!r}")
            if parse_sex(row["gender"])[0] != sex:
                diffs.append(f"gender {row['gender']!r}")
            if diffs:
                res.problem(path, f"annotation sheet row for subject {n} disagrees ({', '.join(diffs)}); "
                                  "file name kept")
        elif sheet:
            res.problem(path, f"subject {n} has no row in {SHEET}")
        rec = Record(
            record_id=f"kauh/{filt}P{n}", patient_id=f"kauh/P{n}", dataset="kauh",
            audio_path=str(path.resolve()), audio_type="lung", diagnosis=diagnosis,
            age=age, sex=sex, location=location, device="electronic stethoscope",
            extra=extra,
        )
        rec.context = render_context(rec)
        res.records.append(rec)
    return res
