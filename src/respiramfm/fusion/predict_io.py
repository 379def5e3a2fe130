"""Input parsing and resumable output files for ``respiramfm predict``.

Metadata arrives as JSON from a user, so it is checked field by field and
turned into the same :class:`~respiramfm.data.records.Record` the dataset
adapters produce; the context template then words it exactly as in training.

Batch prediction keeps a hidden JSON-lines progress file next to the output.
Each finished record (prediction or error) is appended and flushed, so a killed
job resumes without redoing work; the progress file names the model, task and
manifest, and progress from a different run is never mixed in. The final CSV and
errors TSV are written atomically, then the progress file is removed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from respiramfm.data.records import Record
from respiramfm.errors import DataError
from respiramfm.utils.io import atomic_write_text

CSV_FIELDS = ["record_id", "patient_id", "dataset", "split", "task", "label", "probability", "modalities_used",
              "warnings"]
ERROR_FIELDS = ["record_id", "path", "error"]
METADATA_KEYS = ("age", "sex", "gender", "symptoms", "medical_history", "smoker", "location", "audio_type",
                 "device", "gender_text", "age_text", "smoking_text", "symptoms_text")
_SEX = {"m": "male", "male": "male", "man": "male", "f": "female", "female": "female", "woman": "female"}
_YES = {"yes", "y", "true", "1", "smoker", "current smoker"}
_NO = {"no", "n", "false", "0", "non-smoker", "nonsmoker", "never"}


def parse_metadata(text: str) -> dict:
    """A JSON object given inline or as the path of a ``.json`` file (DataError otherwise)."""
    source = "--metadata"
    raw = text
    if not text.lstrip().startswith("{") and Path(text).suffix.lower() == ".json":
        try:
            raw = Path(text).read_text(encoding="utf-8")
            source = text
        except OSError as exc:
            raise DataError(f"cannot read metadata file: {exc.strerror}", path=text) from None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(value, dict):
        raise DataError(f"{source} must be a JSON object, got {type(value).__name__}")
    return value


def _text(value, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "; ".join(_text(v, key) for v in value if _text(v, key))
    if isinstance(value, (dict, bool)):
        raise DataError(f"metadata field {key!r} must be text or a list of text, got {value!r}")
    return str(value).strip()


def metadata_to_record(meta: dict) -> Record:
    """A Record from user metadata; unknown keys and malformed values are DataErrors."""
    unknown = sorted(set(meta) - set(METADATA_KEYS))
    if unknown:
        raise DataError(f"unknown metadata field(s) {unknown}; allowed: {list(METADATA_KEYS)}")
    extra: dict = {}
    age = meta.get("age")
    if age is not None and age != "":
        try:
            age = float(age)
        except (TypeError, ValueError):
            extra["age_text"] = _text(age, "age")  # an age band such as "45-54"
            age = None
        else:
            if isinstance(meta.get("age"), bool) or not math.isfinite(age) or age < 0:
                raise DataError(f"metadata field 'age' must be a non-negative number, got {meta.get('age')!r}")
    else:
        age = None
    sex_raw = _text(meta.get("sex", meta.get("gender")), "sex")
    sex = _SEX.get(sex_raw.lower(), "")
    if sex_raw and not sex:
        extra["gender_text"] = sex_raw
    smoker_raw = meta.get("smoker")
    if isinstance(smoker_raw, bool):
        smoker = "yes" if smoker_raw else "no"
    else:
        s = _text(smoker_raw, "smoker").lower()
        smoker = "yes" if s in _YES else "no" if s in _NO else ""
        if s and not smoker:
            extra["smoking_text"] = s
    for key in ("gender_text", "age_text", "smoking_text", "symptoms_text"):
        if meta.get(key):
            extra[key] = _text(meta[key], key)
    return Record(record_id="input", patient_id="input", dataset="input", audio_type=_text(meta.get("audio_type"), "audio_type"),
                  age=age, sex=sex, symptoms=_text(meta.get("symptoms"), "symptoms"),
                  medical_history=_text(meta.get("medical_history"), "medical_history"), smoker=smoker,
                  location=_text(meta.get("location"), "location"), device=_text(meta.get("device"), "device"),
                  extra=extra)


class ProgressLog:
    """Append-only record of finished rows and errors for one (model, task, manifest) run."""

    def __init__(self, out: Path, header: dict, resume: bool = True):
        self.path = out.with_name(f".{out.name}.progress.jsonl")
        self.header = dict(header)
        self.rows: dict[str, dict] = {}
        self.errors: dict[str, dict] = {}
        if resume and self.path.is_file():
            self._load()
        else:
            self._start()

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"header": self.header}) + "\n")

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            head = json.loads(lines[0]).get("header") if lines else None
        except json.JSONDecodeError:
            head = None
        if head != self.header:  # another model/task/manifest: start over
            self._start()
            return
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that record is simply redone
                continue
            target = self.rows if entry.get("kind") == "row" else self.errors
            target[entry["data"]["record_id"]] = entry["data"]
        for rid in self.rows:
            self.errors.pop(rid, None)

    def done(self, record_id: str) -> bool:
        return record_id in self.rows or record_id in self.errors

    def _append(self, kind: str, data: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"kind": kind, "data": data}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def row(self, data: dict) -> None:
        self.rows[data["record_id"]] = data
        self._append("row", data)

    def error(self, record_id: str, path: str, cause: str) -> None:
        data = {"record_id": record_id, "path": path, "error": " ".join(str(cause).split())}
        self.errors[record_id] = data
        self._append("error", data)


def _table(fields: list[str], rows, delimiter: str = ",") -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, delimiter=delimiter, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in fields})
    return buf.getvalue()


def write_outputs(log: ProgressLog, out: Path, errors: Path) -> tuple[int, int]:
    """Write the predictions CSV and errors TSV atomically, then drop the progress file."""
    atomic_write_text(out, _table(CSV_FIELDS, log.rows.values()))
    atomic_write_text(errors, _table(ERROR_FIELDS, log.errors.values(), delimiter="\t"))
    log.path.unlink(missing_ok=True)
    return len(log.rows), len(log.errors)
