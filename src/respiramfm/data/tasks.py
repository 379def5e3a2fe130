"""Task registry: the built-in paper tasks plus the ones users add, by name.

The :class:`Task` type and the built-in paper tasks T1-T9 live in
:mod:`respiramfm.data.task_defs` and are registered when this module is
imported; users (and the simulated cohort) add tasks from YAML with
:func:`load_tasks_yaml`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import yaml

from respiramfm.data.task_defs import ROLES, TASKS, Task
from respiramfm.errors import ConfigError
from respiramfm.utils.io import atomic_write_text

__all__ = ["ROLES", "Task", "register", "get_task", "all_tasks", "task_from_dict", "load_tasks_yaml",
           "dump_tasks_yaml"]

_REGISTRY: dict[str, Task] = {task.name: task for task in TASKS}


def register(task: Task, overwrite: bool = False) -> Task:
    if task.name in _REGISTRY and not overwrite and _REGISTRY[task.name] != task:
        raise ConfigError(f"task {task.name!r} is already registered with a different definition")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {sorted(_REGISTRY)}") from None


def all_tasks() -> dict[str, Task]:
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
    rows = []
    for t in tasks:
        d = dataclasses.asdict(t)
        d["positive"], d["negative"] = list(t.positive), list(t.negative)
        rows.append(d)
    atomic_write_text(path, yaml.safe_dump({"tasks": rows}, sort_keys=False))
