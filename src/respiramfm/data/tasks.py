"""Task registry: the built-in paper tasks plus the ones users add, by name.

The :class:`Task` type and the built-in paper tasks T1-T9 live in
:mod:`respiramfm.data.task_defs` and are registered when this module is
imported; users (and the simulated cohort) add tasks from YAML with
:func:`load_tasks_yaml`. The file format and the rule for combining file tasks
with built-in ones are in docs/tasks.md; :data:`COMBINE_RULE` says the rule in
one sentence (``respiramfm tasks`` prints it).

Task files are checked before anything is registered, and every error names the
file and the line of the offending task or key (the YAML is composed into nodes,
which keep their marks, before it is turned into Python values).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Iterable

import yaml

from respiramfm.data.task_defs import ROLES, TASKS, Task
from respiramfm.errors import ConfigError
from respiramfm.utils.io import atomic_write_text

__all__ = ["COMBINE_RULE", "rule_note", "ROLES", "Task", "register", "get_task", "all_tasks", "task_from_dict",
           "load_tasks_yaml", "dump_tasks_yaml"]

COMBINE_RULE = ("tasks: [] (the default) runs the built-in T1-T9 (training: T1-T4) when no task file is given, "
                "and ONLY the task files' tasks (training: their supervised ones) when any is given; a file task "
                "with a built-in name replaces it; to run file and built-in tasks together, name them all: "
                "tasks: [MY-TASK, T4, T7]")

_REGISTRY: dict[str, Task] = {task.name: task for task in TASKS}

FIELDS = {f.name: f for f in dataclasses.fields(Task)}
REQUIRED = ("name", "dataset", "disease", "positive", "negative")
TEXT = ("name", "dataset", "disease", "disease_phrase", "audio_type", "description")
FLAGS = ("unseen_disease", "simulated")
FILTERS = ("min_extra", "require_extra", "exclude_extra")


def rule_note(task_files, names, chosen) -> str | None:
    """The one-line reminder a run logs when ``tasks: []`` and task files leave the built-in tasks out."""
    if not task_files or names:
        return None
    return (f"tasks: [] with task file(s): only their tasks run ({', '.join(chosen)}); the built-in T1-T9 do not "
            "unless named, e.g. tasks: [" + ", ".join([*chosen[:1], "T4", "T7"]) + "]")


def register(task: Task, overwrite: bool = False) -> Task:
    if task.name in _REGISTRY and not overwrite and _REGISTRY[task.name] != task:
        raise ConfigError(f"task {task.name!r} is already registered with a different definition")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {sorted(_REGISTRY)} "
                          "(`respiramfm tasks` lists them; a task file adds more)") from None


def all_tasks() -> dict[str, Task]:
    return dict(_REGISTRY)


def task_from_dict(d: dict) -> Task:
    d = dict(d)
    for k in ("positive", "negative"):
        v = d.get(k, ())
        d[k] = tuple([v] if isinstance(v, str) else v)
    if not d.get("disease_phrase") and d.get("disease"):
        d["disease_phrase"] = d["disease"]
    try:
        return Task(**d)
    except TypeError as exc:
        raise ConfigError(f"invalid task definition {d.get('name', '?')}: {exc}") from None


def _line(node) -> int:
    return node.start_mark.line + 1


def _check_task(d: dict, lines: dict, where: str) -> None:
    """Raise ConfigError (message starting with ``line N``) for the first problem of one task mapping."""
    for key in d:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), list(FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"line {lines[key]}: {where}: unknown key {key!r}{hint}; "
                              f"known keys: {', '.join(FIELDS)}")
    missing = [k for k in REQUIRED if k not in d or d[k] in (None, "", [])]
    if missing:
        raise ConfigError(f"line {lines['__task__']}: {where}: missing {', '.join(missing)} "
                          f"(required: {', '.join(REQUIRED)})")
    for key in TEXT:
        if key in d and not isinstance(d[key], str):
            raise ConfigError(f"line {lines[key]}: {where}: {key} must be text, got {d[key]!r}")
    for key in ("positive", "negative"):
        v = d[key]
        values = [v] if isinstance(v, str) else v
        if not isinstance(values, list) or not values or not all(isinstance(x, str) and x for x in values):
            raise ConfigError(f"line {lines[key]}: {where}: {key} must be a diagnosis or a list of diagnoses "
                              f"(Record.diagnosis values), got {v!r}")
    if "role" in d and d["role"] not in ROLES:
        raise ConfigError(f"line {lines['role']}: {where}: role must be one of {', '.join(ROLES)}, got {d['role']!r}")
    for key in FLAGS:
        if key in d and not isinstance(d[key], bool):
            raise ConfigError(f"line {lines[key]}: {where}: {key} must be true or false, got {d[key]!r}")
    if "extra" in d:
        _check_extra(d["extra"], lines["extra"], where)


def _check_extra(extra, line: int, where: str) -> None:
    if not isinstance(extra, dict):
        raise ConfigError(f"line {line}: {where}: extra must be a mapping, got {extra!r}")
    for key in FILTERS:
        spec = extra.get(key)
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise ConfigError(f"line {line}: {where}: extra.{key} must map a record extra key to "
                              f"{'a number' if key == 'min_extra' else 'a list of values'}, got {spec!r}")
        for k, v in spec.items():
            ok = (isinstance(v, (int, float)) and not isinstance(v, bool)) if key == "min_extra" \
                else isinstance(v, list)
            if not ok:
                raise ConfigError(f"line {line}: {where}: extra.{key}.{k} must be "
                                  f"{'a number' if key == 'min_extra' else 'a list'}, got {v!r}")


def parse_tasks_yaml(text: str, path: str | os.PathLike = "<text>") -> list[tuple[Task, int]]:
    """(task, line) for every task of a task file's text; nothing is registered. Errors name ``path`` and a line."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{at}not valid YAML: {exc.problem or exc.context}", path=path) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path=path) from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError("empty task file; expected 'tasks:' with a list of task mappings", path=path)
    seq_node, items = root, data
    if isinstance(data, dict):
        keys = {k.value: (k, v) for k, v in root.value}
        extra_keys = [k for k in data if k != "tasks"]
        if extra_keys or "tasks" not in data:
            key = extra_keys[0] if extra_keys else None
            line = _line(keys[key][0]) if key in keys else _line(root)
            raise ConfigError(f"line {line}: a task file holds one key, 'tasks' (a list of task mappings); "
                              f"got {sorted(map(str, data))}", path=path)
        seq_node, items = keys["tasks"][1], data["tasks"]
    if not isinstance(items, list) or not items:
        raise ConfigError(f"line {_line(seq_node)}: 'tasks' must be a non-empty list of task mappings", path=path)
    out, seen = [], {}
    for node, d in zip(seq_node.value, items):
        if not isinstance(d, dict):
            raise ConfigError(f"line {_line(node)}: each task must be a mapping (name: ..., dataset: ...), "
                              f"got {d!r}", path=path)
        lines = {k.value: _line(k) for k, _ in node.value} | {"__task__": _line(node)}
        where = f"task {d.get('name')!r}" if isinstance(d.get("name"), str) else "task"
        try:
            _check_task(d, lines, where)
            task = task_from_dict(d)
        except ConfigError as exc:
            msg = exc.cause if exc.cause.startswith("line ") else f"line {_line(node)}: {where}: {exc.cause}"
            raise ConfigError(msg, path=path) from None
        if task.name in seen:
            raise ConfigError(f"line {_line(node)}: task {task.name!r} is defined twice (first at line "
                              f"{seen[task.name]})", path=path)
        seen[task.name] = _line(node)
        out.append((task, _line(node)))
    return out


def load_tasks_yaml(path: str | os.PathLike, overwrite: bool = False) -> list[Task]:
    """Check, then register, the tasks of a YAML task file (format: docs/tasks.md)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read task file: {exc.strerror}", path=path) from None
    except UnicodeDecodeError:
        raise ConfigError("task file is not UTF-8 text", path=path) from None
    parsed = parse_tasks_yaml(text, path)
    for task, line in parsed:
        if not overwrite and task.name in _REGISTRY and _REGISTRY[task.name] != task:
            raise ConfigError(f"line {line}: task {task.name!r} is already registered with a different "
                              "definition", path=path)
    return [register(task, overwrite=overwrite) for task, _ in parsed]


def dump_tasks_yaml(tasks: Iterable[Task], path: str | os.PathLike) -> None:
    rows = []
    for t in tasks:
        d = dataclasses.asdict(t)
        d["positive"], d["negative"] = list(t.positive), list(t.negative)
        rows.append(d)
    atomic_write_text(path, yaml.safe_dump({"tasks": rows}, sort_keys=False))
