"""What every evaluation system receives (:class:`EvalData`) and how it is loaded and guarded.

**No test patient in training.** Before any system runs, the manifests must pass
``check_no_leakage`` (no patient in two splits) *and* an explicit check that no
(dataset, patient) of a test record appears among the train/val records.
"""

from __future__ import annotations

from dataclasses import dataclass

from respiramfm.data.splits import is_simulated
from respiramfm.data.records import read_manifest
from respiramfm.data.splits import check_no_leakage
from respiramfm.data.tasks import all_tasks, get_task, load_tasks_yaml
from respiramfm.errors import DataError
from respiramfm.evaluate.config import EvaluateConfig
from respiramfm.evaluate.predictions import task_key


@dataclass
class EvalData:
    """What every system receives. ``records`` holds all splits so systems can *predict* test
    records; fitting and selection must use ``split("train")`` / ``split("val")`` only."""

    records: list
    tasks: dict                      # name -> Task (supervised + zero-shot)
    supervised: list[str]
    zero_shot: list[str]
    manifests: list[str]
    task_files: list[str]
    audio_store: list[str]
    text_store: str
    projector: str
    simulated: bool

    def split(self, name: str) -> list:
        return [r for r in self.records if r.split == name]

    def examples(self, task: str, split: str) -> list[tuple]:
        return self.tasks[task].select(self.split(split))


def select_tasks(names: list[str], task_files: list[str]) -> dict:
    """{name: Task}: ``names`` when given, else every task of ``task_files``, else the real T1-T9."""
    loaded = [t for f in task_files for t in load_tasks_yaml(f, overwrite=True)]
    if names:
        tasks = [get_task(n) for n in names]
    elif loaded:
        tasks = loaded
    else:
        tasks = [t for t in all_tasks().values() if not t.simulated]
    return {t.name: t for t in sorted(tasks, key=lambda t: task_key(t.name))}


def supervised_tasks(task_files: list[str]) -> list[str]:
    return [n for n, t in select_tasks([], task_files).items() if t.role == "supervised"]


def check_test_isolation(records: list) -> None:
    """Refuse when a test record's patient also appears in train/val (in any manifest)."""
    check_no_leakage(records)
    fit = {(r.dataset, r.patient_id) for r in records if r.split in ("train", "val")}
    bad = sorted({f"{d}/{p}" for r in records if r.split == "test" for d, p in [(r.dataset, r.patient_id)]
                  if (d, p) in fit})
    if bad:
        raise DataError(f"{len(bad)} test patient(s) also appear in training/validation data: "
                        f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; refusing to evaluate")


def load_eval_data(cfg: EvaluateConfig) -> EvalData:
    tasks = select_tasks(cfg.tasks, cfg.task_files)
    records, seen = [], {}
    for m in cfg.manifests:
        for r in read_manifest(m):
            if r.record_id in seen:
                raise DataError(f"record id {r.record_id!r} appears in {seen[r.record_id]} and {m}", path=m)
            seen[r.record_id] = m
            records.append(r)
    check_test_isolation(records)
    sup = [n for n, t in tasks.items() if t.role == "supervised"]
    zs = [n for n, t in tasks.items() if t.role == "zero-shot"]
    if not any(t.select([r for r in records if r.split == "test"]) for t in tasks.values()):
        raise DataError(f"no test record belongs to any of the tasks {sorted(tasks)}", path=cfg.manifests[0])
    simulated = is_simulated(records) or any(t.simulated for t in tasks.values())
    return EvalData(records, tasks, sup, zs, list(cfg.manifests), list(cfg.task_files), list(cfg.audio_store),
                    cfg.text_store, cfg.projector, simulated)


__all__ = ["EvalData", "check_test_isolation", "load_eval_data", "select_tasks", "supervised_tasks"]
