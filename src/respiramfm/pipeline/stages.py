"""The pieces every preset's data stage and the recipe share: stage callbacks, the stage runner, ``Inputs``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence


class PipelineCallback:
    """Hooks around every stage; the default does nothing."""

    def on_stage_start(self, name: str) -> None:
        pass

    def on_stage_end(self, name: str) -> None:
        pass

    def training_callbacks(self, name: str) -> list:
        """Extra training-engine callbacks for stage ``name`` (``finetune``); none by default."""
        return []


@dataclass
class Inputs:
    """What the data stage hands to the rest of the recipe."""

    manifest: Path
    task_files: list[str]
    trained: list[str]                # stage-2 (supervised) tasks
    evaluated: list[str]              # evaluation tasks ([] = every task of task_files)
    facts: dict = field(default_factory=dict)   # preset-specific lines of demo_summary.json
    headline: str = ""


class Stages:
    """Runs named stages in order, times them and tells the callbacks."""

    def __init__(self, callbacks: Sequence[PipelineCallback] = (), log: Callable = print):
        self.callbacks, self.log, self.timings = list(callbacks), log, {}

    def training_callbacks(self, name: str) -> list:
        return [c for cb in self.callbacks for c in cb.training_callbacks(name)]

    def __call__(self, name: str, fn: Callable, *args, **kw):
        self.log(f"\n== {name}")
        for cb in self.callbacks:
            cb.on_stage_start(name)
        t0 = time.perf_counter()
        result = fn(*args, **kw)
        self.timings[name] = round(time.perf_counter() - t0, 1)
        for cb in self.callbacks:
            cb.on_stage_end(name)
        return result


__all__ = ["Inputs", "PipelineCallback", "Stages"]
