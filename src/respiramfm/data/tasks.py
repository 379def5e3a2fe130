"""Task registry: which records form a task, what label 1 means, supervised or zero-shot.

Label 1 always means *the condition is present*, so one binary head serves every
task, including zero-shot tasks on unseen datasets and unseen diseases.

The built-in paper tasks T1-T9 are registered in :mod:`respiramfm.data.task_defs`;
users (and the simulated cohort) add tasks from YAML with :func:`load_tasks_yaml`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

from respiramfm.errors import ConfigError

ROLES = ("supervised", "zero-shot")


@dataclass(frozen=True)
class Task:
    name: str                      # e.g. "T4"
    dataset: str                   # Record.dataset value(s) the task draws from
    disease: str                   # short name used in class lists, e.g. "COPD"
    disease_phrase: str            # prompt phrase, e.g. "Chronic obstructive pulmonary disease (COPD)"
    positive: tuple[str, ...]      # Record.diagnosis values labelled 1
    negative: tuple[str, ...]      # Record.diagnosis values labelled 0
    audio_type: str = ""           # restrict to records of this audio type ("" = any)
    role: str = "supervised"       # "supervised" (trained + tested in-domain) or "zero-shot"
    description: str = ""          # dataset description sentence for the prompt
    unseen_disease: bool = False   # zero-shot on a disease never trained on
    simulated: bool = False        # drawn from the simulated cohort (never evidence about patients)
    # Record filters on ``record.extra`` (kept through YAML round trips):
    #   min_extra: {key: threshold}   keep records whose extra[key] is a number >= threshold
    #   require_extra: {key: [values]} keep records whose extra[key] is one of values
    #   exclude_extra: {key: [values]} drop records whose extra[key] is one of values
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConfigError(f"task {self.name}: role must be one of {ROLES}, got {self.role!r}")
        overlap = set(self.positive) & set(self.negative)
        if overlap:
            raise ConfigError(f"task {self.name}: diagnoses {sorted(overlap)} are both positive and negative")

    def label(self, record) -> int | None:
        """1 / 0 for records in the task, ``None`` for records outside it."""
        if record.dataset != self.dataset:
            return None
        if self.audio_type and record.audio_type and record.audio_type != self.audio_type:
            return None
        if record.diagnosis in self.positive:
            y = 1
        elif record.diagnosis in self.negative:
            y = 0
        else:
            return None
        return y if self._passes_extra_filters(record.extra or {}) else None

    def _passes_extra_filters(self, rx: dict) -> bool:
        for key, threshold in (self.extra.get("min_extra") or {}).items():
            v = rx.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < threshold:
                return False
        for key, values in (self.extra.get("require_extra") or {}).items():
            if rx.get(key) not in values:
                return False
        for key, values in (self.extra.get("exclude_extra") or {}).items():
            if rx.get(key) in values:
                return False
        return True

    def select(self, records: Iterable) -> list[tuple[object, int]]:
        """(record, label) pairs of the task, in input order."""
        out = []
        for r in records:
            y = self.label(r)
            if y is not None:
                out.append((r, y))
        return out


_REGISTRY: dict[str, Task] = {}


def register(task: Task, overwrite: bool = False) -> Task:
    if task.name in _REGISTRY and not overwrite and _REGISTRY[task.name] != task:
        raise ConfigError(f"task {task.name!r} is already registered with a different definition")
    _REGISTRY[task.name] = task
    return task


def _ensure_builtins() -> None:
    # Importing the module registers T1-T9 exactly once.
    from respiramfm.data import task_defs  # noqa: F401


def get_task(name: str) -> Task:
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {sorted(_REGISTRY)}") from None


def all_tasks() -> dict[str, Task]:
    _ensure_builtins()
    return dict(_REGISTRY)


def task_from_dict(d: dict) -> Task:
    d = dict(d)
    for k in ("positive", "negative"):
        v = d.get(k, ())
        d[k] = tuple([v] if isinstance(v, str) else v)
    try:
        return Task(**d)
    except TypeError as exc:
        raise ConfigError(f"invalid task definition {d.get('name', '?')}: {exc}") from None


def load_tasks_yaml(path: str | os.PathLike, overwrite: bool = False) -> list[Task]:
    """Register the tasks listed in a YAML file (``tasks: [{name: ..., ...}, ...]``)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read task file: {exc.strerror}", path=path) from None
    items = data.get("tasks", data) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError("task file must hold a list under 'tasks'", path=path)
    return [register(task_from_dict(d), overwrite=overwrite) for d in items]


def dump_tasks_yaml(tasks: Iterable[Task], path: str | os.PathLike) -> None:
    import dataclasses

    import yaml

    from respiramfm.utils.io import atomic_write_text

    rows = []
    for t in tasks:
        d = dataclasses.asdict(t)
        d["positive"], d["negative"] = list(t.positive), list(t.negative)
        rows.append(d)
    atomic_write_text(path, yaml.safe_dump({"tasks": rows}, sort_keys=False))
