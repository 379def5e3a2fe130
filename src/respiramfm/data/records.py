"""Records: one row per recording (or per participant for metadata-only sources).

A manifest is a CSV of :class:`Record` rows, written atomically. Conventions:

* ``audio_path`` is stored relative to the manifest's directory when possible;
  :func:`resolve_audio_path` turns it back into a usable path. Empty = no audio.
* ``symptoms`` / ``medical_history``: ``"; "``-joined canonical phrases;
  the literal ``"none"`` means *explicitly none reported*; ``""`` means
  *not reported / unknown*. The two are never conflated.
* ``age`` is a float in years or ``None``; ``sex`` is ``"male"``, ``"female"`` or ``""``;
  ``smoker`` is ``"yes"``, ``"no"`` or ``""``.
* ``split`` is ``"train"``, ``"val"``, ``"test"`` or ``""`` (not yet assigned).
* ``extra`` is a JSON object of dataset-specific fields (raw status codes, annotations...).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from respiramfm.errors import DataError
from respiramfm.utils.io import atomic_write_text, csv_row, csv_value

SPLITS = ("train", "val", "test", "")


@dataclass
class Record:
    record_id: str
    patient_id: str
    dataset: str
    audio_path: str = ""
    audio_type: str = ""
    diagnosis: str = ""
    age: float | None = None
    sex: str = ""
    symptoms: str = ""
    medical_history: str = ""
    smoker: str = ""
    location: str = ""
    device: str = ""
    split: str = ""
    context: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def has_audio(self) -> bool:
        return bool(self.audio_path)


FIELDS = [f.name for f in dataclasses.fields(Record)]


def _to_row(r: Record) -> dict[str, str]:
    row = {}
    for name in FIELDS:
        v = getattr(r, name)
        if name == "extra":
            row[name] = json.dumps(v, sort_keys=True, ensure_ascii=False) if v else ""
        elif name == "age":
            row[name] = "" if v is None else (f"{v:g}")
        else:
            row[name] = "" if v is None else str(v)
    return row


def _from_row(row: dict[str, str], path: str, line: int) -> Record:
    kw: dict = {}
    for name in FIELDS:
        raw = row.get(name)
        raw = "" if raw is None else raw
        if name == "age":
            if raw.strip() == "":
                kw[name] = None
            else:
                try:
                    kw[name] = float(raw)
                except ValueError:
                    raise DataError(f"line {line}: age {raw!r} is not a number", path=path) from None
        elif name == "extra":
            try:
                kw[name] = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError as exc:
                raise DataError(f"line {line}: extra is not valid JSON ({exc.msg})", path=path) from None
        else:
            kw[name] = raw
    if not kw["record_id"]:
        raise DataError(f"line {line}: empty record_id", path=path)
    if kw["split"] not in SPLITS:
        raise DataError(f"line {line}: unknown split {kw['split']!r} (expected one of train/val/test or empty)", path=path)
    return Record(**kw)


def write_manifest(records: Iterable[Record], path: str | os.PathLike) -> Path:
    """Write records as CSV atomically. Duplicate record ids are an error."""
    path = Path(path)
    records = list(records)
    check_unique_ids(records, str(path))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow(csv_row(_to_row(r)))  # formula-looking cells neutralised (read_manifest undoes it)
    atomic_write_text(path, buf.getvalue())
    return path


def read_manifest(path: str | os.PathLike) -> list[Record]:
    """Read a manifest CSV; malformed rows raise :class:`DataError` naming file and line."""
    path = str(path)
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise DataError("manifest not found", path=path) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest is not UTF-8 text (byte {exc.start})", path=path) from None
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = reader.fieldnames or []
        missing = [c for c in ("record_id", "patient_id", "dataset") if c not in header]
        if missing:
            raise DataError(f"manifest lacks required column(s) {missing}", path=path)
        out = []
        for i, row in enumerate(reader, start=2):
            if None in row:
                raise DataError(f"line {i}: more fields than the header", path=path)
            out.append(_from_row({k: csv_value(v) if isinstance(v, str) else v for k, v in row.items()}, path, i))
    except csv.Error as exc:
        raise DataError(f"malformed CSV at line {reader.line_num}: {exc}", path=path) from None
    check_unique_ids(out, path)
    return out


def check_unique_ids(records: Iterable[Record], path: str | None = None) -> None:
    seen: set[str] = set()
    dups: list[str] = []
    for r in records:
        if r.record_id in seen:
            dups.append(r.record_id)
        seen.add(r.record_id)
    if dups:
        raise DataError(f"duplicate record_id(s): {sorted(set(dups))[:10]}", path=path)


def resolve_audio_path(record: Record, manifest_dir: str | os.PathLike | None = None) -> Path | None:
    """Absolute path of a record's audio (``None`` when it has none)."""
    if not record.audio_path:
        return None
    p = Path(record.audio_path)
    if not p.is_absolute() and manifest_dir is not None:
        p = Path(manifest_dir) / p
    return p


def relative_audio_path(audio: str | os.PathLike, manifest_path: str | os.PathLike) -> str:
    """Store ``audio`` relative to the manifest's directory when it lies beneath it, else absolute."""
    audio = Path(audio).resolve()
    base = Path(manifest_path).resolve().parent
    try:
        return str(audio.relative_to(base))
    except ValueError:
        return os.path.relpath(audio, base) if os.name != "nt" else str(audio)
