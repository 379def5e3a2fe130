"""How many torch intra-op threads a pipeline run uses, so that sharing the cores does not collapse it.

torch's OpenMP workers spin on every core they are given; when another process holds one
of those cores, each parallel region waits for the slowest worker and a two-core run
becomes several times slower than a one-thread run. The pipeline therefore picks its
thread count once, at start:

1. ``threads`` > 0 in the pipeline config (``--set threads=N``) is used as given;
2. else the environment variable ``RESPIRAMFM_THREADS``, when set to a positive integer;
3. else one thread per *free* core: the cores this process may run on
   (``os.sched_getaffinity``) minus the other processes' demand, read from the one-minute
   load average (rounded down), and at least one.

The chosen number is applied with ``torch.set_num_threads`` for the whole run and written
into every stage config that has a ``threads`` setting left at 0. See docs/performance.md.
"""

from __future__ import annotations

import math
import os

import torch

from respiramfm.errors import ConfigError

ENV = "RESPIRAMFM_THREADS"


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def other_load() -> float:
    """Runnable processes besides this one (the one-minute load average; 0 where unknown)."""
    try:
        return max(0.0, os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def detect_threads(cores: int | None = None, load: float | None = None) -> int:
    """One thread per free core (see the module doc), at least 1."""
    cores = usable_cores() if cores is None else cores
    load = other_load() if load is None else load
    return max(1, min(cores, cores - math.floor(load)))


def choose_threads(requested: int = 0) -> int:
    if requested < 0:
        raise ConfigError(f"threads must be >= 0 (0 = detect), got {requested}")
    if requested:
        return requested
    raw = os.environ.get(ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"{ENV} must be a positive integer, got {raw!r}")
        return int(raw)
    return detect_threads()


def apply_threads(requested: int = 0) -> int:
    """Choose the thread count, set it in torch and return it."""
    n = choose_threads(requested)
    torch.set_num_threads(n)
    return n


__all__ = ["ENV", "apply_threads", "choose_threads", "detect_threads", "usable_cores"]
