"""Helpers shared by the dataset adapters: typed CSV reading, value parsing, phrase lists.

Every adapter turns a dataset *as its publishers ship it* into :class:`Record` rows.
Two kinds of trouble are told apart on purpose:

* **structural** problems (a metadata file missing, not UTF-8, broken quoting, a
  required column absent) mean the adapter cannot trust anything in the file, so
  they raise :class:`DataError` naming the file and the cause;
* **per-item** problems (one row with too many fields, an unknown label, an audio
  file that is not there) are appended to ``AdapterResult.problems`` and the job
  goes on, so one bad row never costs the other records.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from respiramfm.data.records import Record
from respiramfm.errors import DataError


@dataclass
class AdapterResult:
    """What an adapter returns: the records it could build and a line per problem it met."""

    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def problem(self, path: str | os.PathLike | None, cause: str) -> None:
        self.problems.append(f"{os.fspath(path)}\t{cause}" if path is not None else cause)


@dataclass
class CsvTable:
    path: Path
    header: list[str]
    rows: list[tuple[int, dict[str, str]]]  # (line number of the row's last physical line, row)
    bad_rows: list[tuple[int, str]]          # (line, cause) for rows that could not be used


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """UTF-8 text of ``path`` (a BOM is dropped); typed errors for absence and bad bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} not found", path=path) from None
    except IsADirectoryError:
        raise DataError(f"{what} is a directory, expected a file", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read {what}: {exc.strerror}", path=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{what} is not UTF-8 text (bad byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line})",
                        path=path) from None
    return text[1:] if text.startswith("\ufeff") else text


def read_csv(path: str | os.PathLike, required: Iterable[str] = (), what: str = "CSV file",
             delimiter: str = ",") -> CsvTable:
    """Read a CSV with a header row.

    Header names are stripped of surrounding spaces (Coswara's annotation files write
    `` QUALITY``). Broken quoting raises :class:`DataError` with the line; a row with
    more or fewer fields than the header is returned in ``bad_rows`` for the caller
    to report, never silently padded or truncated.
    """
    path = Path(path)
    text = read_text(path, what)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{what} is empty (no header row)", path=path)
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{what} lacks required column(s) {missing}; found {header[:12]}", path=path)
        dup = sorted({h for h in header if header.count(h) > 1 and h})
        if dup:
            raise DataError(f"{what} has duplicate column name(s) {dup}", path=path)
        rows: list[tuple[int, dict[str, str]]] = []
        bad: list[tuple[int, str]] = []
        for values in reader:
            line = reader.line_num
            if not values or all(not v.strip() for v in values):
                continue  # blank line
            if len(values) != len(header):
                bad.append((line, f"line {line}: {len(values)} fields, header has {len(header)}"))
                continue
            rows.append((line, dict(zip(header, values))))
    except csv.Error as exc:
        raise DataError(f"malformed {what} at line {reader.line_num}: {exc}", path=path) from None
    return CsvTable(path=path, header=header, rows=rows, bad_rows=bad)


# --------------------------------------------------------------------------- values

_TRUE = {"true", "1", "1.0", "yes", "y", "t"}
_FALSE = {"false", "0", "0.0", "no", "n", "f"}
_MISSING = {"", "na", "nan", "n/a", "none", "null", "unknown"}


def parse_bool(value: str | None) -> bool | None:
    """``True``/``False`` for explicit answers, ``None`` for blank/NA.

    Blank is *not* truthy: pandas reads a blank flag as NaN, and ``bool(nan)`` is
    ``True``, which is how several public pipelines turned unanswered questions into
    symptoms. Unrecognised text is ``None`` too (the caller may report it).
    """
    if value is None:
        return None
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    return None


def parse_age(value: str | None) -> float | None:
    """Age in years, or ``None`` for blank/NA/non-numeric/implausible values (never ``nan``)."""
    if value is None:
        return None
    v = value.strip()
    if v.lower() in _MISSING:
        return None
    try:
        age = float(v)
    except ValueError:
        return None
    if not math.isfinite(age) or age < 0 or age > 130:
        return None
    return age


def parse_sex(value: str | None) -> tuple[str, str]:
    """``(sex, other)``: sex is 'male'/'female'/''; ``other`` keeps any other explicit answer."""
    if value is None:
        return "", ""
    v = clean(value).lower()
    if v in ("m", "male", "man"):
        return "male", ""
    if v in ("f", "female", "woman"):
        return "female", ""
    if v in _MISSING or v in ("prefer not to say", "prefer_not_to_say", "pnts"):
        return "", ""
    return "", v


def parse_float(value: str | None) -> float | None:
    if value is None or value.strip().lower() in _MISSING:
        return None
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def clean(value: str | None) -> str:
    """Collapse runs of whitespace and strip; ``None`` becomes ''."""
    return re.sub(r"\s+", " ", value or "").strip()


def join_phrases(phrases: Iterable[str]) -> str:
    """Canonical ``"; "``-joined phrase list, duplicates dropped, order kept."""
    out: list[str] = []
    for p in phrases:
        p = clean(p)
        if p and p not in out:
            out.append(p)
    return "; ".join(out)


def flag_phrases(row: dict[str, str], code_map: dict[str, str], *, true_only: bool = True) -> tuple[list[str], bool]:
    """Phrases of the flags set in ``row`` and whether every flag was explicitly answered.

    With ``true_only`` only an explicit true value counts; blank or odd text never does.
    """
    phrases, all_answered = [], True
    for col, phrase in code_map.items():
        b = parse_bool(row.get(col))
        if b is True:
            phrases.append(phrase)
        elif b is None:
            all_answered = False
    return phrases, all_answered


def index_files(directory: Path, suffixes: Iterable[str]) -> dict[str, Path]:
    """Map file name -> path for the files directly inside ``directory`` with the given suffixes."""
    suffixes = tuple(s.lower() for s in suffixes)
    out: dict[str, Path] = {}
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if entry.is_file() and entry.name.lower().endswith(suffixes):
                    out[entry.name] = Path(entry.path)
    except FileNotFoundError:
        return {}
    return out


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} not found (expected a directory)", path=path)
    return path


def first_existing(root: Path, candidates: Iterable[str], what: str) -> Path:
    """The first of ``root/candidate`` that exists, or a DataError listing where we looked."""
    tried = []
    for c in candidates:
        p = root / c
        if p.exists():
            return p
        tried.append(c)
    raise DataError(f"{what} not found under the dataset root (looked for {tried})", path=root)
