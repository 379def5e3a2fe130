"""The one lock style of the package: an advisory file lock (``filelock``) next to what it guards.

Two uses: a *writer* lock that refuses at once when another run already writes
the same store (two writers on one store are a mistake, not a queue), and a
*short section* lock that waits its turn (merging a shared memo file).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from respiramfm.errors import RespiraMFMError


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, busy: RespiraMFMError | None = None) -> Iterator[None]:
    """Hold ``lock_path`` for the block.

    With ``busy`` given, a lock held elsewhere raises ``busy`` at once; without
    it, the call waits until the holder releases the lock.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0 if busy is not None else -1)
    try:
        lock.acquire()
    except Timeout:
        raise busy from None
    try:
        yield
    finally:
        lock.release()
