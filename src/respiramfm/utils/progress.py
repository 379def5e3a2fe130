"""Progress of a long command: a tqdm bar on a terminal, plain lines in a log, and the ``--threads`` flag.

:func:`progress` returns a bar-like object (``update(n)``, ``close()``, a context manager).
With ``enabled`` and stderr a terminal it is a tqdm bar. Otherwise (``--no-progress``, or
output going to a log file) it writes one plain line to stderr at most every ``every_s``
seconds and one at the end, ``embed logmel-stats: 120/480 clip (25 %), 31 s``, so a log
shows the command moving without the carriage-return noise of a bar.

:func:`add_run_flags` / :func:`apply_threads_flag` give every long command the same
``--threads N`` (torch intra-op CPU threads; 0 = leave torch's default, or
``RESPIRAMFM_THREADS`` when set) and ``--no-progress``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ENV_THREADS = "RESPIRAMFM_THREADS"


class LineProgress:
    """A plain-line stand-in for a tqdm bar (see the module doc)."""

    def __init__(self, total: int, desc: str, unit: str, every_s: float = 10.0, stream=None):
        self.total, self.desc, self.unit, self.every_s = int(total), desc, unit, every_s
        self.n, self.start = 0, time.monotonic()
        self.last = self.start
        self.stream = stream
        self.closed = False

    def _print(self) -> None:
        share = f" ({100 * self.n // self.total} %)" if self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{share}, {time.monotonic() - self.start:.0f} s",
              file=self.stream or sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._print()

    def close(self) -> None:
        if not self.closed and self.total:
            self._print()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, unit: str, enabled: bool = True, every_s: float = 10.0):
    """A tqdm bar when ``enabled`` on a terminal, else :class:`LineProgress`."""
    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return LineProgress(total, desc, unit, every_s)


def add_run_flags(parser: argparse.ArgumentParser, progress_help: str = "no progress bar (plain progress lines "
                                                                          "on stderr instead)") -> None:
    parser.add_argument("--threads", type=int, default=0,
                        help=f"torch CPU threads (default 0: ${ENV_THREADS} when set, else torch's default)")
    parser.add_argument("--no-progress", action="store_true", help=progress_help)


def apply_threads_flag(threads: int) -> int:
    """Set torch's intra-op threads from ``--threads`` (or the environment); returns the count in use."""
    from respiramfm.errors import ConfigError

    if threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {threads}")
    if not threads:
        raw = os.environ.get(ENV_THREADS, "").strip()
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise ConfigError(f"{ENV_THREADS} must be a positive integer, got {raw!r}")
            threads = int(raw)
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


__all__ = ["ENV_THREADS", "LineProgress", "add_run_flags", "apply_threads_flag", "progress"]
