"""Dataset roles in a run: which datasets serve only zero-shot tasks, and the guard every training stage calls.

A dataset is *zero-shot-only* in a run when at least one of the run's tasks draws from it and
every such task has the role ``zero-shot`` (built-in: KAUH for T7-T9, Coswara for T5, CODA TB
for T6). Its records are test data as a whole: a stage that trains anything (``pretrain-audio``,
``align``, ``finetune``, every evaluated baseline) refuses a manifest that puts any of them in
``train``, ``val`` or no split (:func:`refuse_zero_shot_rows`), because a zero-shot claim on a
dataset the model was tuned on, or scored on a random slice of it, is not a zero-shot claim.

``prepare DATASET --role zero-shot`` and ``merge --zero-shot DATASET`` give such a dataset its
one role (every record in ``test``) through :func:`as_test_only`.

The run's tasks (:func:`run_tasks`) are those of its task files when it has any, else the
built-in paper tasks T1-T9, plus any task it names explicitly.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Iterable, Sequence

from respiramfm.data.task_defs import TASKS
from respiramfm.data.tasks import get_task, load_tasks_yaml
from respiramfm.errors import DataError

TRAINING_SPLITS = ("train", "val", "")  # "" (unassigned) counts as training everywhere


class ZeroShotLeakError(DataError):
    """Records of a dataset that the run uses only for zero-shot tasks would reach a training stage."""

    def __init__(self, message: str, stage: str, counts: dict[str, int], path=None):
        self.stage, self.counts = stage, dict(counts)
        super().__init__(message, path=path)


def run_tasks(task_files: Sequence[str] = (), names: Sequence[str] = ()) -> list:
    """The run's tasks: those of ``task_files`` (registered) or else the built-in T1-T9, plus ``names``."""
    tasks = [t for f in task_files for t in load_tasks_yaml(f, overwrite=True)] or list(TASKS)
    have = {t.name for t in tasks}
    return tasks + [get_task(n) for n in names if n not in have]


def zero_shot_only(tasks: Iterable) -> list[str]:
    """Datasets that the given tasks draw from only through zero-shot tasks (sorted)."""
    tasks = list(tasks)
    trained = {t.dataset for t in tasks if t.role != "zero-shot"}
    return sorted({t.dataset for t in tasks if t.role == "zero-shot"} - trained)


def supervised_datasets(tasks: Iterable) -> list[str]:
    """Datasets of the supervised tasks among ``tasks`` (sorted): what stage 1 aligns on by default."""
    return sorted({t.dataset for t in tasks if t.role == "supervised"})


def zero_shot_tasks_of(tasks: Iterable, dataset: str) -> list[str]:
    return sorted(t.name for t in tasks if t.dataset == dataset)


def refuse_zero_shot_rows(records: Iterable, tasks: Iterable, stage: str, splits: Sequence[str] = TRAINING_SPLITS,
                          path=None) -> None:
    """Raise :class:`ZeroShotLeakError` when a record of a zero-shot-only dataset sits in ``splits``.

    The message names the stage, each dataset with its row count per split and its tasks, and
    the two ways out (make the dataset test-only, or give it a supervised task).
    """
    tasks = list(tasks)
    only = set(zero_shot_only(tasks))
    if not only:
        return
    wanted = set(splits)
    per: dict[str, Counter] = {}
    for r in records:
        if r.dataset in only and r.split in wanted:
            per.setdefault(r.dataset, Counter())[r.split or "unassigned"] += 1
    if not per:
        return
    counts = {d: sum(c.values()) for d, c in sorted(per.items())}
    parts = [f"{d}: {counts[d]} row(s) ({', '.join(f'{k} {v}' for k, v in sorted(per[d].items()))}; "
             f"its tasks {', '.join(zero_shot_tasks_of(tasks, d))} are all zero-shot)" for d in counts]
    fix = ("Make such a dataset test data as a whole: " + ", ".join(
        f"`respiramfm prepare {d} ... --role zero-shot`" for d in counts) + " (or `respiramfm merge ... " +
        " ".join(f"--zero-shot {d}" for d in counts) + "`); to train on it instead, give it a supervised task "
        "in a task file")
    raise ZeroShotLeakError(f"{stage} refuses records of zero-shot-only dataset(s) outside the test split: "
                            f"{'; '.join(parts)}. {fix}", stage, counts, path=path)


def as_test_only(records: Iterable, datasets: Iterable[str] | None = None) -> list:
    """Copies of ``records`` with every record of ``datasets`` (None: all) in the test split."""
    chosen = None if datasets is None else set(datasets)
    return [dataclasses.replace(r, split="test") if chosen is None or r.dataset in chosen else r for r in records]


__all__ = ["TRAINING_SPLITS", "ZeroShotLeakError", "as_test_only", "refuse_zero_shot_rows", "run_tasks",
           "supervised_datasets", "zero_shot_only"]
