"""How many torch intra-op threads a pipeline run uses, so that sharing the cores does not collapse it.

torch's OpenMP workers spin on every core they are given; when another process holds one
of those cores, each parallel region waits for the slowest worker and a two-core run
becomes several times slower than a one-thread run. The pipeline therefore picks its
thread count once, at start:

1. ``threads`` > 0 in the pipeline config (``--set threads=N``) is used as given;
2. else the environment variable ``RESPIRAMFM_THREADS``, when set to a positive integer;
3. else one thread per *free* core: the cores this process may run on
   (``os.sched_getaffinity``) minus the other processes' demand, read from the one-minute
   load average (rounded down), and at least one; then, because a load average lags (a
   process started seconds ago barely shows), a short measurement decides: about 0.5 s of
   fp32 matrix products with one thread and with that many threads, and the larger count is
   kept only when it is at least ``GAIN`` (10 %) faster. On a quiet two-core machine two
   threads measure about 1.6x one thread; with another process spinning on one core, two
   threads measure slower than one, so the run uses one.

The chosen number is applied with ``torch.set_num_threads`` for the whole run and written
into every stage config that has a ``threads`` setting left at 0. See docs/performance.md.
"""

from __future__ import annotations

import math
import os
import time

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


GAIN = 1.10


def gemm_rate(threads: int, size: int = 384, seconds: float = 0.08) -> float:
    """Matrix products per second with ``threads`` intra-op threads (best of three short bursts)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
        torch.mm(a, b)
        best = 0.0
        for _ in range(3):
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                torch.mm(a, b)
                n += 1
            best = max(best, n / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(previous)


def measured_threads(upper: int, rate=gemm_rate) -> int:
    """``upper`` when it measures at least ``GAIN`` times one thread's rate, else 1."""
    if upper <= 1:
        return 1
    return upper if rate(upper) >= GAIN * rate(1) else 1


def choose_threads(requested: int = 0, rate=gemm_rate) -> int:
    if requested < 0:
        raise ConfigError(f"threads must be >= 0 (0 = detect), got {requested}")
    if requested:
        return requested
    raw = os.environ.get(ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"{ENV} must be a positive integer, got {raw!r}")
        return int(raw)
    return measured_threads(detect_threads(), rate)


def apply_threads(requested: int = 0) -> int:
    """Choose the thread count, set it in torch and return it."""
    n = choose_threads(requested)
    torch.set_num_threads(n)
    return n


__all__ = ["ENV", "GAIN", "apply_threads", "choose_threads", "detect_threads", "gemm_rate", "measured_threads",
           "usable_cores"]
