"""``respiramfm tasks [--task-file F]``: every task that exists, with what it draws and asks.

For each task: its dataset, the diagnoses labelled 1 and 0, its role (``supervised``: trained
and tested in-domain; ``zero-shot``: never trained on, tested only), the audio type it keeps,
any record filters, and the prompt the LLM reads. ``--task-file`` adds (or, for an existing
name, replaces) the tasks of a YAML file first, exactly as ``finetune``/``evaluate`` do, so
a user can check a task file before a run. ``--json`` prints the same as JSON.

The task-file format and the rule for combining file tasks with built-in ones are in
docs/tasks.md; the listing ends with what a run with ``tasks: []`` (the default) would use,
and ``--json`` marks it per task (``in_default_run``, ``in_default_training``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from respiramfm.data.task_defs import TASKS
from respiramfm.data.tasks import COMBINE_RULE, all_tasks, load_tasks_yaml
from respiramfm.data.templates import task_prompt


def describe(task) -> dict:
    return {"name": task.name, "dataset": task.dataset, "role": task.role, "disease": task.disease,
            "positive": list(task.positive), "negative": list(task.negative), "audio_type": task.audio_type,
            "unseen_disease": task.unseen_disease, "simulated": task.simulated,
            "filters": {k: v for k, v in (task.extra or {}).items() if k.endswith("_extra")},
            "prompt": task_prompt(task)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task-file", type=Path, action="append", default=[],
                        help="YAML task file to load first (repeatable; see the format in this module's docs)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--no-prompt", action="store_true", help="leave the prompts out of the text listing")


def default_run(from_file: list) -> tuple[list[str], list[str]]:
    """(every task, the training tasks) of a run with ``tasks: []`` (see COMBINE_RULE)."""
    chosen = from_file or [t for t in TASKS if not t.simulated]
    return [t.name for t in chosen], [t.name for t in chosen if t.role == "supervised"]


def run(args: argparse.Namespace) -> int:
    loaded = [t for f in args.task_file for t in load_tasks_yaml(f, overwrite=True)]
    from_file = {t.name for t in loaded}
    builtin = {t.name for t in TASKS}
    run_all, run_train = default_run(loaded)
    rows = [describe(t) | {"source": ("file, replaces built-in" if t.name in builtin else "file")
                           if t.name in from_file else "built-in",
                           "in_default_run": t.name in run_all, "in_default_training": t.name in run_train}
            for t in all_tasks().values()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        labels = f"1 = {', '.join(r['positive'])}; 0 = {', '.join(r['negative'])}"
        kind = r["role"] + (", unseen disease" if r["unseen_disease"] else "") + (", simulated" if r["simulated"] else "")
        audio = f", audio {r['audio_type']}" if r["audio_type"] else ""
        print(f"{r['name']:<8} {r['dataset']:<10} {kind:<28} {labels}{audio} [{r['source']}]")
        if r["filters"]:
            print(f"{'':<8} filters: {r['filters']}")
        if not args.no_prompt:
            print(f"{'':<8} prompt: {r['prompt']}")
    source = "the task file(s)" if loaded else "no task file"
    print(f"\nWith {source}, a run with tasks: [] evaluates {', '.join(run_all) or 'nothing'} and trains on "
          f"{', '.join(run_train) or 'nothing (no supervised task)'}.")
    print(f"Rule: {COMBINE_RULE}.")
    return 0
