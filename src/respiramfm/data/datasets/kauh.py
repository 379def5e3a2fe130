"""KAUH lung-sound dataset (Fraiwan et al., Mendeley Data doi 10.17632/jwyy9np4gv, CC BY 4.0).

Layout as published::

    ROOT/AudioFiles/{B|D|E}P{n}_{diagnosis},{sound type},{location},{age},{M|F}.wav
    ROOT/Data annotation.xlsx          one row per subject n (optional, only cross-checked)

The audio folder may also be named ``Audio Files`` or ``Audio Files Test`` (public copies
of the middle 10 s of each recording), or be given with ``audio_dir``. Text after the sex
letter (``_middle10sec``, `` - Copy``) is a file-name suffix, kept in ``extra['name_suffix']``
and never read as part of the sex. Files whose bytes equal an earlier file of the
same subject and diagnosis (the publishers' "- Copy" duplicates, or one recording filed under
two filter modes) are reported and skipped; when the identical file names another subject or
diagnosis, neither label can be trusted and both files are skipped. A second, different file
for the same filter mode and subject is reported and skipped.

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

import hashlib
import re
from pathlib import Path

from respiramfm.data.datasets.common import (
    AdapterResult, clean, first_existing, index_files, parse_age, parse_sex, require_dir,
)
from respiramfm.data.records import Record
from respiramfm.data.templates import render_context

AUDIO_DIRS = ("AudioFiles", "Audio Files", "Audio Files Test")
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
#: the sex letter, then any file-name suffix such as "_middle10sec" or " - Copy_middle10sec"
_SEX_SUFFIX_RE = re.compile(r"^\s*([MF])((?:[\s_-].*)?)$", re.IGNORECASE)


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
    sm = _SEX_SUFFIX_RE.match(sex_raw)
    suffix = ""
    if sm:
        sex_raw, suffix = sm.group(1), sm.group(2).strip(" _-")
    return {"filter": filt, "subject": num, "diagnosis_raw": diag_raw, "sound_raw": sound_raw,
            "location_raw": loc_raw, "age_raw": age_raw, "sex_raw": sex_raw, "suffix": suffix}


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


def _audio_dir(root: Path, audio_dir: str | Path | None) -> Path:
    if audio_dir:
        path = Path(audio_dir)
        return require_dir(path if path.is_absolute() else root / path, "KAUH audio folder (--audio-dir)")
    return first_existing(root, AUDIO_DIRS, "KAUH audio folder")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_kauh(root: str | Path, audio_dir: str | Path | None = None, **_opts) -> AdapterResult:
    """Records for every KAUH recording under the audio folder (see the module docstring)."""
    root = Path(root)
    audio_dir = _audio_dir(root, audio_dir)
    res = AdapterResult()
    sheet_path = root / SHEET
    sheet = read_sheet(sheet_path) if sheet_path.exists() else f"{SHEET} absent; file names used alone"
    if isinstance(sheet, str):
        res.problem(sheet_path, sheet)
        sheet = {}

    files = index_files(audio_dir, (".wav",))

    def order(name: str):
        m = NAME_RE.match(name)
        copy = "copy" in name.lower()
        return (int(m.group(2)), m.group(1).upper(), copy, name) if m else (10**9, "", copy, name)

    by_digest: dict[str, tuple[Path, int, str]] = {}   # digest -> (first file, subject, raw diagnosis)
    conflicting: set[Path] = set()
    by_id: dict[str, Path] = {}
    for fname in sorted(files, key=order):
        path = files[fname]
        parsed = parse_name(Path(fname).stem)
        if isinstance(parsed, str):
            res.problem(path, f"{parsed}; skipped")
            continue
        digest = _digest(path)
        if digest in by_digest:
            first, subject, diag_raw = by_digest[digest]
            if subject == parsed["subject"] and normalise_diagnosis(diag_raw) == normalise_diagnosis(parsed["diagnosis_raw"]):
                res.problem(path, f"byte-identical to {first.name} (a duplicate copy); skipped")
            else:  # one recording under two subjects or two diagnoses: neither label can be trusted
                conflicting.add(first)
                res.problem(path, f"byte-identical to {first.name}, which names another subject or diagnosis; "
                                  "both skipped")
            continue
        by_digest[digest] = (path, parsed["subject"], parsed["diagnosis_raw"])
        rid = f"kauh/{parsed['filter']}P{parsed['subject']}"
        if rid in by_id:
            res.problem(path, f"a second recording for filter {parsed['filter']} of subject {parsed['subject']} "
                              f"(first: {by_id[rid].name}) with different content; skipped")
            continue
        by_id[rid] = path
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
        if parsed["suffix"]:
            extra["name_suffix"] = parsed["suffix"]
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
    if conflicting:
        kept = {str(p.resolve()) for p in conflicting}
        res.records = [r for r in res.records if r.audio_path not in kept]
    return res
