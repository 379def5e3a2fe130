"""A user's own CSV, mapped column by column onto :class:`Record` fields.

This is how data that is not public (TBscreen for T3, a clinic's own recordings)
enters the pipeline::

    respiramfm prepare generic --root DIR --csv metadata.csv --dataset tbscreen \\
        --columns record_id=file,patient_id=subject,audio_path=path,diagnosis=tb_result \\
        --diagnosis-map 1=tb,0=non-tb --audio-type cough --out tb.csv

``--columns`` maps Record fields to CSV columns; a field whose own name is a CSV
column is mapped implicitly. Columns left unmapped are kept in ``extra``. Audio paths
are relative to the CSV's folder (or absolute). Values are normalised like the
built-in adapters do: sex to male/female, smoker to yes/no, symptom and history lists
(split on ``;``, ``,`` or ``|``) to lower-case phrases with "none"/"no" meaning
explicitly none, split to train/val/test.

Errors: an unreadable CSV, a mapped column that is absent, a repeated record id or a
patient given two different splits (the file is ambiguous and only its owner can say
which row is right) raise :class:`DataError` naming the CSV; a row with a bad value
(unknown split, a label outside ``--labels``, wrong field count) is reported and
skipped; a missing audio file keeps its record as metadata-only and is reported.
"""

from __future__ import annotations

import re
from pathlib import Path

from respiramfm.data.datasets.common import (
    AdapterResult, clean, join_phrases, parse_age, parse_bool, parse_sex, read_csv,
)
from respiramfm.data.records import Record
from respiramfm.data.splits import check_no_leakage
from respiramfm.data.templates import render_context
from respiramfm.errors import ConfigError, DataError

#: every Record field a CSV column can feed, with what it means (shown by ``prepare generic --help``)
FIELD_HELP = {
    "record_id": "unique id of the recording (default: the audio file name without suffix); prefixed with the dataset name",
    "patient_id": "who was recorded; several recordings of one patient share it (default: the record id)",
    "audio_path": "audio file, relative to the CSV's folder or absolute (empty: metadata-only record)",
    "audio_type": "cough, breath, lung, vowel, ... (or --audio-type for all rows)",
    "diagnosis": "the label text, lower-cased; --diagnosis-map renames values, --labels restricts them",
    "age": "age in years (blank/NA/implausible -> unreported)",
    "sex": "male/female (m/f accepted; anything else is kept in extra)",
    "symptoms": "symptom list split on ';', ',' or '|'; 'none'/'no' means explicitly none",
    "medical_history": "history/comorbidity list, same rules as symptoms",
    "smoker": "yes/no (true/false, 1/0 accepted)",
    "location": "where the recording was taken (e.g. chest position)",
    "device": "recording device (audited as a possible shortcut by `respiramfm audit`)",
    "split": "train/val/test (training, validation, dev, testing accepted); blank: assigned by patient",
}
MAPPABLE = tuple(FIELD_HELP)
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
          "dev": "val", "test": "test", "testing": "test", "": ""}
_NONE_WORDS = {"none", "no", "nil", "nothing", "no symptoms", "asymptomatic"}


def parse_mapping(spec: str, what: str = "--columns") -> dict[str, str]:
    """``"a=x,b=y"`` -> ``{"a": "x", "b": "y"}`` (whitespace around names ignored)."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ConfigError(f"{what}: {item.strip()!r} is not KEY=VALUE")
        key, value = (s.strip() for s in item.split("=", 1))
        if not key or key in out:
            raise ConfigError(f"{what}: empty or repeated key {key!r}")
        out[key] = value
    return out


def _phrases(raw: str) -> str:
    v = clean(raw)
    if not v:
        return ""
    if v.lower() in _NONE_WORDS:
        return "none"
    return join_phrases(p.lower() for p in re.split(r"[;,|]", v))


def _smoker(raw: str) -> tuple[str, str]:
    v = clean(raw).lower()
    b = parse_bool(v)
    if b is not None:
        return ("yes" if b else "no"), ""
    if v in ("current", "smoker", "current smoker"):
        return "yes", ""
    if v in ("never", "non-smoker", "nonsmoker", "never smoked"):
        return "no", ""
    if v.startswith("ex") or "former" in v:
        return "", "ex-smoker"
    return "", ""


def load_generic(root: str | Path, csv: str | Path | None = None, columns: str = "", dataset: str = "",
                 diagnosis_map: str = "", labels: str = "", audio_type: str = "", **_opts) -> AdapterResult:
    """Records from a user CSV (see the module docstring)."""
    root = Path(root)
    if csv is not None:
        csv_path = Path(csv) if Path(csv).is_absolute() else root / csv
    elif root.is_file():
        csv_path, root = root, root.parent
    else:
        csv_path = root / "metadata.csv"
    name = clean(dataset).lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name):
        raise ConfigError(f"--dataset must be a short name (letters, digits, _ . -), got {dataset!r}")
    mapping = parse_mapping(columns)
    unknown = sorted(set(mapping) - set(MAPPABLE))
    if unknown:
        raise ConfigError(f"--columns: unknown field(s) {unknown}; mappable fields are {list(MAPPABLE)}")
    table = read_csv(csv_path, required=list(mapping.values()), what="metadata CSV")
    for f in MAPPABLE:
        if f not in mapping and f in table.header:
            mapping[f] = f
    if "record_id" not in mapping and "audio_path" not in mapping:
        raise DataError("map a record_id column (or an audio_path column to derive ids from)", path=csv_path)
    diag_map = {k.lower(): v for k, v in parse_mapping(diagnosis_map, "--diagnosis-map").items()}
    allowed = {clean(x).lower() for x in labels.split(",") if clean(x)}
    base_dir = csv_path.parent
    mapped_cols = set(mapping.values())

    res = AdapterResult()
    for _line, cause in table.bad_rows:
        res.problem(csv_path, f"{cause}; row skipped")
    if "patient_id" not in mapping:
        res.problem(csv_path, "no patient_id column mapped: every record is its own patient")
    first_line: dict[str, int] = {}
    for line, row in table.rows:
        get = lambda f: clean(row.get(mapping[f], "")) if f in mapping else ""  # noqa: E731
        audio_raw = get("audio_path")
        rid = get("record_id") or (Path(audio_raw).stem if audio_raw else "")
        if not rid:
            res.problem(csv_path, f"line {line}: empty record id; row skipped")
            continue
        if rid in first_line:
            raise DataError(f"record id {rid!r} appears on lines {first_line[rid]} and {line}", path=csv_path)
        first_line[rid] = line
        raw_diag = get("diagnosis")
        diagnosis = clean(diag_map.get(raw_diag.lower(), raw_diag)).lower()
        if allowed and diagnosis not in allowed:
            res.problem(csv_path, f"line {line}: label {raw_diag!r} is not one of {sorted(allowed)}; row skipped")
            continue
        split_raw = get("split").lower()
        if split_raw not in SPLITS:
            res.problem(csv_path, f"line {line}: unknown split {split_raw!r} (train/val/test); row skipped")
            continue
        extra = {c: clean(v) for c, v in row.items() if c not in mapped_cols and clean(v)}
        age_raw = get("age")
        age = parse_age(age_raw)
        if age is None and age_raw and age_raw.lower() not in ("na", "nan", "unknown", "none"):
            if re.search(r"\d", age_raw) and not re.fullmatch(r"-?[\d.]+", age_raw):
                extra["age_text"] = age_raw  # a band such as "40-49" or "60+"
            else:
                res.problem(csv_path, f"line {line}: age {age_raw!r} is not a usable age; left unreported")
        sex, other = parse_sex(get("sex"))
        if other:
            extra["gender_text"] = other
        smoker, smoking_text = _smoker(get("smoker"))
        if smoking_text:
            extra["smoking_text"] = smoking_text

        audio = ""
        if audio_raw:
            p = Path(audio_raw)
            p = p if p.is_absolute() else base_dir / p
            if p.is_file():
                audio = str(p.resolve())
            else:
                res.problem(p, "audio missing; kept as a metadata-only record")
        pid = get("patient_id") or rid
        rec = Record(
            record_id=f"{name}/{rid}", patient_id=f"{name}/{pid}", dataset=name, audio_path=audio,
            audio_type=(get("audio_type") or clean(audio_type)).lower(), diagnosis=diagnosis, age=age, sex=sex,
            symptoms=_phrases(get("symptoms")), medical_history=_phrases(get("medical_history")),
            smoker=smoker, location=get("location").lower(), device=get("device"), split=SPLITS[split_raw],
            extra=extra,
        )
        rec.context = render_context(rec)
        res.records.append(rec)
    check_no_leakage(res.records, path=csv_path)  # a patient put in two splits by this file: name the file
    return res
