"""Reading the files of a saved model as untrusted input: type, size and depth checked before use.

A model directory may come from anywhere (a download, a colleague, a tampered copy), so
nothing in it is trusted until checked:

* only **regular files** are read: a FIFO would block forever, ``/dev/zero`` would read until
  memory runs out, a directory or a symlink loop would end in a traceback. Files are opened
  with ``O_NONBLOCK`` and checked with ``fstat`` on the open descriptor, so a file swapped for
  a FIFO between check and use is still refused;
* every file has a **size limit** (:data:`MAX_JSON_BYTES` for JSON; :data:`MAX_TENSOR_BYTES`
  for safetensors, whose header safetensors itself bounds);
* JSON must be UTF-8, nested at most :data:`MAX_JSON_DEPTH` deep (measured on the text before
  parsing by :func:`respiramfm.utils.io.loads_json_bounded`, so a 100,000-deep document costs
  one linear scan, not a RecursionError), and of the expected top-level type.

Every refusal is a :class:`~respiramfm.errors.CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

from respiramfm.errors import CheckpointError, RespiraMFMError
from respiramfm.utils.io import loads_json_bounded

MAX_JSON_BYTES = 4 * 1024 * 1024          # config.json of a real model is a few KiB
MAX_JSON_DEPTH = 32                       # ours nest 4 deep
MAX_TENSOR_BYTES = 8 * 1024 ** 3          # adapters of multi-billion-parameter LLMs stay far below


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _stat_error(path: Path, exc: OSError, what: str, error: type[RespiraMFMError] = CheckpointError):
    if exc.errno == errno.ENOENT:
        return error(f"{what} is missing (file not found)", path=path)
    if exc.errno == errno.ELOOP:
        return error(f"{what} is a symlink loop", path=path)
    return error(f"{what} cannot be read ({exc.strerror})", path=path)


def check_regular_file(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_TENSOR_BYTES,
                       error: type[RespiraMFMError] = CheckpointError) -> Path:
    """``path`` if it is a regular file (symlinks followed) of at most ``max_bytes``; else ``error``.

    ``error`` is the typed error to raise (CheckpointError for model files; the audio and
    metadata inputs of ``predict`` use AudioDecodeError / DataError).
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise _stat_error(p, exc, what, error) from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} is not a regular file ({_kind(st.st_mode)})", path=p)
    if st.st_size > max_bytes:
        raise error(f"{what} is {st.st_size} bytes, above the limit of {max_bytes}", path=p)
    return p


def check_directory(path: str | os.PathLike, what: str = "directory") -> Path:
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise _stat_error(p, exc, what) from None
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{what} is not a directory", path=p)
    return p


def read_bytes(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_JSON_BYTES,
               error: type[RespiraMFMError] = CheckpointError) -> bytes:
    """The content of a regular file of at most ``max_bytes`` (never blocks on a FIFO, never reads a device)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _stat_error(p, exc, what, error) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} is not a regular file ({_kind(st.st_mode)})", path=p)
        if st.st_size > max_bytes:
            raise error(f"{what} is {st.st_size} bytes, above the limit of {max_bytes}", path=p)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew while we read it
        raise error(f"{what} is above the limit of {max_bytes} bytes", path=p)
    return data


def read_json(path: str | os.PathLike, what: str | None = None, kind: type = dict,
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a JSON file checked for type, size, encoding, depth and top-level ``kind``."""
    p = Path(path)
    what = what or p.name
    data = read_bytes(p, what, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})", path=p) from None
    try:
        value = loads_json_bounded(text, what, max_depth=max_depth, error=CheckpointError)
    except CheckpointError as exc:
        raise CheckpointError(exc.cause, path=p) from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{what} must hold a JSON {_json_name(kind)}, found {_json_name(type(value))}",
                              path=p)
    return value


def _json_name(tp: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number",
            bool: "boolean", type(None): "null"}.get(tp, tp.__name__)


def expect_type(value: Any, kind: type | tuple[type, ...], where: str, path: str | os.PathLike) -> Any:
    """``value`` if it is a ``kind``; else a CheckpointError naming ``where`` (a config section)."""
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        ok = False
    else:
        ok = isinstance(value, kind)
    if not ok:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        want = " or ".join(_json_name(k) for k in kinds)
        raise CheckpointError(f"{where} must be a JSON {want}, found {_json_name(type(value))}", path=path)
    return value


__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_TENSOR_BYTES", "check_directory", "check_regular_file",
           "expect_type", "read_bytes", "read_json"]
