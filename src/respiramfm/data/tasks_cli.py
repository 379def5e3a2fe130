"""``respiramfm tasks [--task-file F]``: every task that exists, with what it draws and asks.

For each task: its dataset, the diagnoses labelled 1 and 0, its role (``supervised``: trained
and tested in-domain; ``zero-shot``: never trained on, tested only), the audio type it keeps,
any record filters, and the prompt the LLM reads. ``--task-file`` adds (or, for an existing
name, replaces) the tasks of a YAML file first, exactly as ``finetune``/``evaluate`` do, so
a user can check a task file before a run. ``--json`` prints the same as JSON.

Task-file format (one mapping per task under ``tasks:``; ``dataset``, ``disease``,
``positive`` and ``negative`` are required, the rest optional)::

    tasks:
      - name: CLINIC-COPD
        dataset: clinic            # Record.dataset of the records it draws from
        disease: COPD              # short name used in the class list
        disease_phrase: chronic obstructive pulmonary disease (COPD)
        positive: [copd]           # Record.diagnosis values labelled 1
        negative: [healthy]        # Record.diagnosis values labelled 0
        audio_type: lung           # optional: keep only this audio type
        role: supervised           # or zero-shot
        description: This data comes from our clinic's stethoscope recordings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from respiramfm.data.tasks import all_tasks, load_tasks_yaml
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


def run(args: argparse.Namespace) -> int:
    from_file = {t.name for f in args.task_file for t in load_tasks_yaml(f, overwrite=True)}
    rows = [describe(t) | {"source": "file" if t.name in from_file else "built-in"}
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
    return 0
