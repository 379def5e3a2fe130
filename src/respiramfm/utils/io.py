"""Atomic file writes, content hashing, bounded JSON parsing and spreadsheet-safe CSV cells.

Every file respiramfm writes goes through these helpers: data is written to a
temporary file in the destination directory, flushed, fsynced and renamed over
the target, so a killed job never leaves a half-written output behind.

:func:`loads_json_bounded` parses JSON from users and model directories: the
nesting depth is checked (in linear time) before the parser runs, so a deeply
nested value is a typed error, not a ``RecursionError``; integers longer than
:data:`MAX_INT_DIGITS` digits read as floats instead of raising ``ValueError``.

:func:`csv_cell` is the one rule for CSV cells (see docs/reliability.md): a text
cell a spreadsheet would run as a formula -- it starts with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return and is not a plain number -- is written with a
leading apostrophe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from respiramfm.errors import DataError, RespiraMFMError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success.

    The caller writes the temporary file however it likes (numpy, safetensors,
    torch). On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide and not thread-safe to query


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a dict of torch tensors with safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def user_cache_dir(*parts: str) -> Path:
    """Per-user cache directory for converted models and other derived artefacts.

    ``RESPIRAMFM_CACHE`` overrides it; otherwise ``$XDG_CACHE_HOME/respiramfm`` or
    ``~/.cache/respiramfm``. Never inside the repository.
    """
    root = os.environ.get("RESPIRAMFM_CACHE")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "respiramfm"
    out = base.joinpath(*parts)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------- bounded JSON

#: Deepest nesting of arrays/objects :func:`loads_json_bounded` accepts by default.
MAX_JSON_DEPTH = 64
#: Longest integer literal parsed as an int; longer ones become floats (Python refuses > 4300 digits).
MAX_INT_DIGITS = 64
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` in JSON text, string contents skipped; linear time, no recursion."""
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _int_or_float(literal: str) -> int | float:
    return int(literal) if len(literal.lstrip("-")) <= MAX_INT_DIGITS else float(literal)


def loads_json_bounded(text: str, source: str, *, max_depth: int = MAX_JSON_DEPTH,
                       error: type[RespiraMFMError] = DataError) -> Any:
    """``json.loads`` for untrusted text; every failure is ``error`` naming ``source`` and the cause."""
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{source} is nested too deeply: {depth} levels (limit {max_depth})")
    try:
        return json.loads(text, parse_int=_int_or_float)
    except json.JSONDecodeError as exc:
        raise error(f"{source} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:  # unreachable after the depth check; kept so no input can escape as a crash
        raise error(f"{source} is nested too deeply") from None


# ----------------------------------------------------------------------------- CSV cells

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _formula_like(text: str) -> bool:
    body = text.lstrip("'")  # an apostrophe already in front is counted, so the rule can be undone exactly
    return len(body) > 1 and body.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(body)


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not execute: formula-looking text gets a leading apostrophe.

    Non-strings pass unchanged; so do plain numbers such as ``-3.5`` or ``+1e-3``
    and a lone ``-``.  :func:`csv_value` undoes it when the project reads its own CSVs.
    """
    return "'" + value if isinstance(value, str) and _formula_like(value) else value


def csv_value(cell: str) -> str:
    """The value :func:`csv_cell` was given (one added apostrophe removed)."""
    return cell[1:] if cell.startswith("'") and _formula_like(cell[1:]) else cell


def csv_row(row: Any) -> Any:
    """:func:`csv_cell` applied to every value of a row (a dict's values, or a sequence)."""
    if isinstance(row, dict):
        return {k: csv_cell(v) for k, v in row.items()}
    return [csv_cell(v) for v in row]
