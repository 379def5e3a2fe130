"""What every evaluation system receives (:class:`EvalData`) and how it is loaded and guarded.

**No test patient in training.** Before any system runs, the manifests must pass
``check_no_leakage`` (no patient in two splits) *and* an explicit check that no
(dataset, patient) of a test record appears among the train/val records.

**Paired test sets.** Every system is scored on the same test records: the test records that
the multimodal model can score (audio with a stored embedding, when the run has audio stores).
The others are taken out of the test split once, for every system, and listed in
``EvalData.excluded``; the protocol then refuses a system that leaves a record of this common
set unscored (:func:`check_coverage`), so no system is compared on a smaller set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from respiramfm.data.splits import is_simulated
from respiramfm.data.records import read_manifest, relative_audio_path, resolve_audio_path, write_manifest
from respiramfm.data.roles import refuse_zero_shot_rows
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
    excluded: list = field(default_factory=list)   # {"record_id", "dataset", "reason"}: test records no system scores

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


CONTEXT_ONLY_SYSTEMS = ("text_only",)  # systems that read the context alone: a record needs a context for them


def paired_test_records(records: list, tasks: dict, audio_store: list[str],
                        need_context: bool = False) -> tuple[list, list[dict]]:
    """(records kept, excluded): test records of the tasks that some system of the run cannot score.

    A record is kept when the multimodal input can be built from it (audio with a stored finite
    embedding, when the run has audio stores) and, with ``need_context`` (a text-only system is in
    the run), when it has a context.
    """
    from respiramfm.models.processing import InputProcessor

    processor = InputProcessor(stores=list(audio_store))
    kept, excluded = [], []
    for r in records:
        task = next((t for t in tasks.values() if t.select([r])), None) if r.split == "test" else None
        if task is not None:
            item, why = processor.record_item(task, r, use_audio=bool(audio_store))
            if item is not None and need_context and not item.context.strip():
                item, why = None, "no context (a text-only system is in the run)"
            if item is None:
                excluded.append({"record_id": r.record_id, "dataset": r.dataset, "reason": why})
                continue
        kept.append(r)
    return kept, excluded


def write_records_manifest(data: EvalData, records: list, manifest: Path) -> list:
    """Write ``records`` (of ``data``'s manifests) as one manifest, audio paths re-anchored; returns them."""
    origin = {}
    for m in data.manifests:
        for r in read_manifest(m):
            origin[r.record_id] = Path(m).parent
    kept = []
    for r in records:
        audio = resolve_audio_path(r, origin.get(r.record_id))
        kept.append(replace(r, audio_path=relative_audio_path(audio, manifest) if audio else ""))
    manifest.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(kept, manifest)
    return kept


def check_coverage(data: EvalData, preds: dict, system: str) -> None:
    """Refuse predictions that leave a record of the common test set unscored (pairing would break)."""
    test = data.split("test")
    for name, task in data.tasks.items():
        want = {r.record_id for r, _ in task.select(test)}
        missing = sorted(want - set(preds.get(name) or {}))
        if missing:
            raise DataError(f"system {system!r} left {len(missing)} of the {len(want)} common test record(s) of "
                            f"{name} unscored ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); every "
                            "system must score the same records")


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
    refuse_zero_shot_rows(records, tasks.values(), stage="evaluate", path=cfg.manifests[0])  # no baseline trains on them
    sup = [n for n, t in tasks.items() if t.role == "supervised"]
    zs = [n for n, t in tasks.items() if t.role == "zero-shot"]
    if not any(t.select([r for r in records if r.split == "test"]) for t in tasks.values()):
        raise DataError(f"no test record belongs to any of the tasks {sorted(tasks)}", path=cfg.manifests[0])
    simulated = is_simulated(records) or any(t.simulated for t in tasks.values())
    records, excluded = paired_test_records(records, tasks, list(cfg.audio_store),
                                            need_context=any(s in CONTEXT_ONLY_SYSTEMS for s in cfg.systems))
    return EvalData(records, tasks, sup, zs, list(cfg.manifests), list(cfg.task_files), list(cfg.audio_store),
                    cfg.text_store, cfg.projector, simulated, excluded)


__all__ = ["CONTEXT_ONLY_SYSTEMS", "EvalData", "check_coverage", "check_test_isolation", "load_eval_data", "paired_test_records",
           "select_tasks", "supervised_tasks", "write_records_manifest"]
