"""The data stage of the real-data preset: the paper's T1-T9 on datasets laid out as their publishers ship them.

``data_root`` holds one folder per adapter (``icbhi/``, ``kauh/``, ``coswara/``, ``coughvid/``,
``ukcovid19/``, ``codatb/``; whichever exist). Each is prepared into ``OUT/data/KEY.csv``
(patient-level splits; datasets that serve only zero-shot tasks, KAUH, Coswara and CODA TB,
are test data as a whole), then combined into ``OUT/data/manifest.csv`` (ids carry the dataset
prefix, audio paths re-expressed relative to the new manifest, metadata-only records kept).
Stage 2 trains the supervised tasks (T1-T4) that have training audio and test records; the
evaluation covers every paper task with test records.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from respiramfm.data.prepare import prepare
from respiramfm.data.records import read_manifest, relative_audio_path, resolve_audio_path, write_manifest
from respiramfm.data.tasks import get_task
from respiramfm.errors import ConfigError, DataError
from respiramfm.pipeline.config import PipelineConfig
from respiramfm.pipeline.layout import PipelineLayout
from respiramfm.pipeline.stages import Inputs

ADAPTER_KEYS = ("icbhi", "kauh", "coswara", "coughvid", "ukcovid19", "codatb")
PAPER_TASKS = tuple(f"T{i}" for i in range(1, 10))
ADAPTER_OPTIONS = {"coswara": {"modality": "cough-shallow"}, "ukcovid19": {"modality": "cough"},
                   "kauh": {"audio_dir": None}}  # the `respiramfm prepare` defaults


def found_datasets(root: Path) -> list[str]:
    return [k for k in ADAPTER_KEYS if (root / k).is_dir()]


def check_real(cfg: PipelineConfig) -> list[str]:
    """Refuse a real-data run before anything is written: the encoder weights and at least one dataset."""
    ckpt = cfg.encoder.checkpoint
    if cfg.encoder.name != "opera-ct" or not ckpt:
        raise ConfigError("real data need the OPERA-CT checkpoint: pass --opera-checkpoint PATH (see `respiramfm "
                          "fetch-opera`); an untrained encoder is never used on real recordings")
    if not Path(ckpt).is_file():
        raise ConfigError("OPERA-CT checkpoint not found", path=ckpt)
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise DataError("data root not found", path=root)
    found = found_datasets(root)
    if not found:
        raise DataError(f"no dataset folder found; expected one or more of {', '.join(k + '/' for k in ADAPTER_KEYS)}",
                        path=root)
    return found


def zero_shot_only() -> set[str]:
    """Datasets the paper uses only for zero-shot tasks (KAUH, Coswara, CODA TB): never trained on."""
    tasks = [get_task(n) for n in PAPER_TASKS]
    return {t.dataset for t in tasks if t.role == "zero-shot"} - {t.dataset for t in tasks if t.role == "supervised"}


def prepare_dataset(key: str, root: Path, out: Path, seed: int, whole_test: bool) -> None:
    """``respiramfm prepare KEY`` with its defaults; ``whole_test``: ``--role zero-shot`` (every record in test)."""
    args = argparse.Namespace(source=key, root=root, out=out, report=None, splits="assign", seed=seed,
                              fractions=(0.7, 0.1, 0.2), role="zero-shot" if whole_test else "supervised",
                              **ADAPTER_OPTIONS.get(key, {}))
    prepare(args)


def combine(found: list[str], lay: PipelineLayout) -> list:
    """One manifest of every dataset's records, audio paths relative to ``OUT/data/manifest.csv``."""
    records = []
    for key in found:
        part = lay.dataset_manifest(key)
        for r in read_manifest(part):
            if not r.record_id.startswith(f"{r.dataset}/"):
                raise DataError(f"record id {r.record_id!r} lacks its dataset prefix", path=part)
            if r.audio_path:
                r.audio_path = relative_audio_path(resolve_audio_path(r, lay.data), lay.manifest)
            records.append(r)
    write_manifest(records, lay.manifest)
    return records


def plan_tasks(records: list) -> tuple[list[str], list[str], dict[str, str]]:
    """(trained supervised tasks, evaluated tasks, skipped task -> reason) for T1-T9 on these records."""
    trained, evaluated, skipped = [], [], {}
    test = [r for r in records if r.split == "test"]
    train = [r for r in records if r.split == "train" and r.has_audio]
    for name in PAPER_TASKS:
        task = get_task(name)
        if task.role == "supervised" and not task.select(train):
            skipped[name] = f"no {task.dataset} training record with audio"  # e.g. T3: TBscreen is not public
        elif not task.select(test):
            skipped[name] = f"no {task.dataset} test record"
        else:
            trained += [name] if task.role == "supervised" else []
            evaluated.append(name)
    return trained, evaluated, skipped


def prepare_real(cfg: PipelineConfig, lay: PipelineLayout, stage: Callable) -> Inputs:
    """Prepare every dataset found (one stage each), combine them and plan the tasks."""
    root, log = Path(cfg.data_root), getattr(stage, "log", print)
    found = check_real(cfg)
    absent = [k for k in ADAPTER_KEYS if k not in found]
    log(f"== real data under {root}: found {', '.join(found)}; absent: {', '.join(absent) or 'none'}")
    zero_shot = zero_shot_only()
    for key in found:
        if key in zero_shot:
            log(f"   ({key} serves only zero-shot tasks: every {key} patient goes to the test split)")
        stage(f"prepare-{key}", prepare_dataset, key, root / key, lay.dataset_manifest(key), cfg.seed,
              key in zero_shot)
    records = combine(found, lay)
    log(f"   combined {len(records)} records ({sum(r.has_audio for r in records)} with audio) -> {lay.manifest}")
    trained, evaluated, skipped = plan_tasks(records)
    for name, why in skipped.items():
        log(f"   ({name} skipped: {why})")
    if not trained:
        raise DataError("stage 2 needs a supervised paper task (T1-T4) with training audio and test records; "
                        f"found only {', '.join(found)}", path=root)
    facts = {"simulated": False, "data_root": str(root), "datasets": found,
             "records": {k: sum(r.dataset == k for r in records) for k in found},
             "tasks": {"trained": trained, "evaluated": evaluated, "skipped": skipped},
             "opera_checkpoint": str(cfg.encoder.checkpoint), "device": cfg.device}
    return Inputs(lay.manifest, [], trained, evaluated, facts, f"on real data ({', '.join(found)})")


__all__ = ["ADAPTER_KEYS", "PAPER_TASKS", "check_real", "combine", "plan_tasks", "prepare_real", "zero_shot_only"]
