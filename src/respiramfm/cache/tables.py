"""Tab-separated report tables of the stores (errors, skipped records, record -> key mappings)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable, Sequence

from respiramfm.errors import DataError
from respiramfm.utils.io import atomic_write_text, csv_cell, csv_value


def _clean(text: object) -> str:
    """One line of text: tabs and newlines inside a cell would break the table for line tools."""
    return " ".join(str(text).split())


def write_tsv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write ``header`` and ``rows`` atomically; whitespace inside cells is collapsed to single spaces."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(header)
    for row in rows:
        w.writerow([csv_cell(_clean(x)) for x in row])  # formula-looking cells neutralised (read_tsv undoes it)
    atomic_write_text(path, buf.getvalue())


def read_tsv(path: Path, columns: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Rows of a table as dicts; ``[]`` when the file does not exist.

    With ``columns`` given, a table whose header or row widths differ is a
    :class:`DataError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"unreadable table ({exc})", path=path) from None
    if not rows:
        if columns is not None:
            raise DataError(f"malformed table (expected the header {tuple(columns)})", path=path)
        return []
    header = rows[0]
    if columns is not None and (tuple(header) != tuple(columns) or any(len(r) != len(header) for r in rows[1:])):
        raise DataError(f"malformed table (expected tab-separated columns {tuple(columns)})", path=path)
    return [dict(zip(header, map(csv_value, r))) for r in rows[1:]]
