"""`respiramfm evaluate`: the T1-T9 protocol over systems and seeds (tables, predictions, provenance).

For every seed and every system: fit on the train split of the supervised tasks, select
on validation, predict the test split of every task (supervised and zero-shot; zero-shot
tasks go through the same binary head with their own prompt). Scores are AUROC with a
patient-level bootstrap CI (:mod:`respiramfm.evaluate.metrics`), aggregated as mean ± std
over seeds (:mod:`respiramfm.evaluate.results`).

**No test patient in training.** Before any system runs, the manifests must pass
``check_no_leakage`` (no patient in two splits) *and* an explicit check that no
(dataset, patient) of a test record appears among the train/val records. A system's
predictions may only name test records of the task (anything else is a DataError).

**Systems** are functions ``fit_predict(data, seed, work_dir, options) -> {task: {record_id:
prob}}`` registered by name (:func:`register_system`; the interface is documented in
``EvalData``). "respiramfm" is built in; the baselines register themselves when
``respiramfm.evaluate.baselines`` is imported.

**Resumable:** each (system, seed) unit writes ``predictions/<system>/seed<N>.csv``
atomically when done; a rerun skips finished units and only recomputes the tables.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from respiramfm.config import add_config_arguments, load_config, save_config, to_dict
from respiramfm.errors import ConfigError, DataError
from respiramfm.fusion.train import FinetuneConfig
from respiramfm.utils.io import atomic_write_json, atomic_write_text, sha256_file

PRED_FIELDS = ("record_id", "patient", "task", "label", "prob")


@dataclass
class EvaluateConfig:
    manifests: list[str] = field(default_factory=list)
    task_files: list[str] = field(default_factory=list)     # task definitions (e.g. the simulated cohort's)
    audio_store: list[str] = field(default_factory=list)    # `respiramfm embed` output dir(s)
    text_store: str = ""                                    # `respiramfm embed-text` output dir (baselines)
    projector: str = ""                                     # `respiramfm align` output dir
    encoder: str = ""                                       # encoder checkpoint (provenance only)
    tasks: list[str] = field(default_factory=list)          # [] = all tasks of task_files, else built-in T1-T9
    systems: list[str] = field(default_factory=lambda: ["respiramfm"])
    systems_options: dict = field(default_factory=dict)     # {system: {its own options}}
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # the "respiramfm" system's training
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_boot: int = 1000
    out_dir: str = "runs/evaluate"
    report: bool = True                                     # write report.html at the end
    quick: bool = False                                     # passed to systems (shorter training)
    data_efficiency: str = ""                               # a system to retrain on nested training fractions
    efficiency_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
    efficiency_seeds: list[int] = field(default_factory=list)  # [] = the first of `seeds`

    def validate(self) -> "EvaluateConfig":
        if not self.manifests:
            raise ConfigError("no manifest given (manifests=[...])")
        if not self.systems:
            raise ConfigError("no system to evaluate (systems=[...])")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {self.seeds!r}")
        if self.n_boot < 0:
            raise ConfigError("n_boot must be >= 0")
        if self.data_efficiency and not all(0 < f <= 1 for f in self.efficiency_fractions or [0]):
            raise ConfigError(f"efficiency_fractions must lie in (0, 1], got {self.efficiency_fractions!r}")
        return self


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


SystemFn = Callable[[EvalData, int, Path, dict], dict]
_SYSTEMS: dict[str, tuple[SystemFn, str]] = {}


def register_system(name: str, fn: SystemFn, description: str = "") -> None:
    _SYSTEMS[name] = (fn, description)


def get_system(name: str) -> SystemFn:
    if name not in _SYSTEMS:
        try:
            importlib.import_module("respiramfm.evaluate.baselines")
        except ModuleNotFoundError as exc:
            if exc.name != "respiramfm.evaluate.baselines":
                raise
    if name not in _SYSTEMS:
        raise ConfigError(f"unknown system {name!r}; known: {sorted(_SYSTEMS)}")
    return _SYSTEMS[name][0]


# --------------------------------------------------------------------------- data


def select_tasks(names: list[str], task_files: list[str]) -> dict:
    from respiramfm.data.tasks import all_tasks, get_task, load_tasks_yaml

    loaded = [t for f in task_files for t in load_tasks_yaml(f, overwrite=True)]
    if names:
        tasks = [get_task(n) for n in names]
    elif loaded:
        tasks = loaded
    else:
        tasks = [t for t in all_tasks().values() if not t.simulated]
    return {t.name: t for t in sorted(tasks, key=lambda t: _task_key(t.name))}


def _task_key(name: str):
    head, _, num = name.rpartition("T")
    return (head, int(num)) if num.isdigit() else (name, 0)


def check_test_isolation(records: list) -> None:
    """Refuse when a test record's patient also appears in train/val (in any manifest)."""
    from respiramfm.data.splits import check_no_leakage

    check_no_leakage(records)
    fit = {(r.dataset, r.patient_id) for r in records if r.split in ("train", "val")}
    bad = sorted({f"{d}/{p}" for r in records if r.split == "test" for d, p in [(r.dataset, r.patient_id)]
                  if (d, p) in fit})
    if bad:
        raise DataError(f"{len(bad)} test patient(s) also appear in training/validation data: "
                        f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; refusing to evaluate")


def load_eval_data(cfg: EvaluateConfig) -> EvalData:
    from respiramfm.align.data import is_simulated
    from respiramfm.data.records import read_manifest

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


# --------------------------------------------------------------------------- the built-in system


def trained_respiramfm(data: EvalData, seed: int, work_dir: Path, options: dict):
    """The protocol's RespiraMFM for ``seed``: fine-tuned (stage 2, selected on validation) and loaded.

    ``options["finetune_dir"]`` (optional, may contain ``{seed}``) puts the training run
    somewhere else than ``work_dir/finetune``, e.g. where ``respiramfm finetune`` already
    trained with the same config: training then resumes from its last checkpoint (no work).
    """
    from respiramfm.fusion.model import RespiraMFM
    from respiramfm.fusion.train import finetune

    cfg: FinetuneConfig = options["finetune"]
    run_dir = Path(str(options["finetune_dir"]).format(seed=seed)) if options.get("finetune_dir") else work_dir / "finetune"
    cfg.manifests, cfg.task_files, cfg.audio_store = data.manifests, data.task_files, data.audio_store
    cfg.projector = cfg.projector or data.projector
    cfg.tasks, cfg.seed, cfg.out_dir, cfg.progress = list(data.supervised), int(seed), str(run_dir), False
    finetune(cfg)
    return RespiraMFM.from_pretrained(run_dir / "model"), cfg


def respiramfm_system(data: EvalData, seed: int, work_dir: Path, options: dict) -> dict:
    """Fine-tune RespiraMFM (:func:`trained_respiramfm`), then score every task's test records."""
    model, cfg = trained_respiramfm(data, seed, work_dir, options)
    return predict_tasks(model, data, batch_size=cfg.eval_batch_size)


def record_context(rec) -> str:
    """The context text exactly as stage-2 training builds it (manifest text, else the template)."""
    from respiramfm.data.templates import render_context

    return rec.context.strip() if rec.context and rec.context.strip() else render_context(rec)


def predict_tasks(model, data: EvalData, batch_size: int = 32, drop_context: bool = False) -> dict:
    """{task: {record_id: prob}} on the test split; records without a needed embedding are left out.

    ``drop_context`` removes every record's context (inference with the text missing).
    """
    import numpy as np

    from respiramfm.fusion.infer import items_to_resolved, predict_proba
    from respiramfm.fusion.sequence import FusionItem

    stores = []
    if model.cfg.mode != "text_only":
        from respiramfm.encoders.store import EmbeddingStore

        stores = [EmbeddingStore(d) for d in data.audio_store]
    test = data.split("test")
    out: dict[str, dict[str, float]] = {}
    for name, task in data.tasks.items():
        items, ids = [], []
        for rec, _ in task.select(test):
            audio = None
            if stores:
                store = next((s for s in stores if rec.record_id in s), None)
                audio = store.get(rec.record_id) if store is not None else None
                if audio is None or not np.isfinite(audio).all():
                    continue
            context = "" if drop_context else record_context(rec)
            items.append(FusionItem(task=task, audio=None if audio is None else np.asarray(audio, np.float32),
                                    context=context, audio_type=rec.audio_type))
            ids.append(rec.record_id)
        if items:
            probs = predict_proba(model, items_to_resolved(model, items), batch_size=batch_size)
            out[name] = {i: float(p) for i, p in zip(ids, probs)}
    return out


register_system("respiramfm", respiramfm_system, "RespiraMFM: aligned projector + LLM with LoRA (stage 2)")


# --------------------------------------------------------------------------- running


def _write_predictions(path: Path, data: EvalData, preds: dict, system: str) -> int:
    test = {r.record_id: r for r in data.split("test")}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PRED_FIELDS)
    n = 0
    for task in sorted(preds, key=_task_key):
        if task not in data.tasks:
            raise DataError(f"system {system!r} returned predictions for unknown task {task!r}")
        labels = {r.record_id: y for r, y in data.tasks[task].select(test.values())}
        for rid, p in preds[task].items():
            if rid not in labels:
                raise DataError(f"system {system!r} predicted {rid!r} for {task}, which is not a test record of "
                                f"that task")
            if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p <= 1.0):
                raise DataError(f"system {system!r}: probability {p!r} for {rid!r} ({task}) is not in [0, 1]")
            r = test[rid]
            w.writerow([rid, f"{r.dataset}/{r.patient_id}", task, labels[rid], repr(float(p))])
            n += 1
    atomic_write_text(path, buf.getvalue())
    return n


def read_predictions(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["label"], r["prob"] = int(r["label"]), float(r["prob"])
    return rows


def _hash_dir_meta(d: str) -> dict:
    p = Path(d)
    files = [p] if p.is_file() else sorted(x for x in p.glob("*") if x.is_file() and x.suffix in (".json", ".safetensors"))
    return {str(f): sha256_file(f) for f in files}


def provenance(cfg: EvaluateConfig, data: EvalData) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("respiramfm", "torch", "transformers", "peft", "accelerate", "scikit-learn", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    hashes: dict = {}
    for item in [*cfg.manifests, *cfg.task_files]:
        hashes[item] = sha256_file(item)
    for d in [*cfg.audio_store, cfg.text_store, cfg.projector]:
        if d and Path(d).exists():
            hashes.update(_hash_dir_meta(d))
    return {"versions": versions, "seeds": list(cfg.seeds), "systems": list(cfg.systems),
            "config": to_dict(cfg), "data_sha256": hashes, "simulated": data.simulated,
            "tasks": {n: {"role": t.role, "dataset": t.dataset, "simulated": t.simulated}
                      for n, t in data.tasks.items()}}


def _options(cfg: EvaluateConfig, name: str) -> dict:
    import copy

    options = dict(cfg.systems_options.get(name) or {})
    options["quick"] = cfg.quick
    options["finetune"] = copy.deepcopy(cfg.finetune)  # the LLM baselines start from it too
    return options


def evaluate(cfg: EvaluateConfig, log=print) -> dict:
    """Run every unfinished (system, seed) unit, then write the tables (and the report)."""

    from respiramfm.evaluate.results import summarise, write_tables

    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_eval_data(cfg)
    fns = {name: get_system(name) for name in cfg.systems}  # unknown names fail before any work
    if cfg.data_efficiency:
        get_system(cfg.data_efficiency)
    save_config(cfg, out / "config.yaml")
    atomic_write_json(out / "provenance.json", provenance(cfg, data))
    for seed in cfg.seeds:
        for name, fn in fns.items():
            path = out / "predictions" / name / f"seed{seed}.csv"
            if path.is_file():
                log(f"[evaluate] {name} seed {seed}: done earlier ({path})")
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            log(f"[evaluate] {name} seed {seed}: fitting and predicting")
            preds = fn(data, int(seed), out / "work" / name / f"seed{seed}", _options(cfg, name))
            n = _write_predictions(path, data, preds, name)
            log(f"[evaluate] {name} seed {seed}: {n} test predictions -> {path}")
    if cfg.data_efficiency:  # nested fractions of the training patients; resumes from its own predictions
        from respiramfm.evaluate.efficiency import data_efficiency

        options = _options(cfg, cfg.data_efficiency)
        options.pop("finetune_dir", None)  # never reuse (or overwrite) the full-data runs
        data_efficiency(data, cfg.data_efficiency, out / "efficiency" / cfg.data_efficiency,
                        seeds=cfg.efficiency_seeds or cfg.seeds[:1],
                        fractions=cfg.efficiency_fractions, options=options, log=log)
    summary = summarise(out, data, cfg.systems, cfg.seeds, n_boot=cfg.n_boot)
    write_tables(out, summary)
    if cfg.report:
        from respiramfm.evaluate.report import build_report

        summary["report"] = str(build_report(out))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML config (configs/evaluate.yaml)",
                         "--set seeds=[0] --set systems=[respiramfm,respllm]")
    parser.add_argument("--textcheck", metavar="DATA_ROOT", default=None,
                        help="instead: the text-only COVID check on the real Coswara/Coughvid metadata under "
                             "DATA_ROOT (writes OUT/textcheck.json)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(EvaluateConfig, args.config, args.overrides)
    if args.textcheck:
        from respiramfm.evaluate.textcheck import run_textcheck

        res = run_textcheck(args.textcheck, out=Path(cfg.out_dir) / "textcheck.json")
        print(json.dumps(res, indent=1))
        return 0
    summary = evaluate(cfg)
    print(json.dumps({"out_dir": cfg.out_dir, "averages": summary["averages"], "report": summary.get("report")},
                     indent=1))
    return 0


__all__ = ["EvalData", "EvaluateConfig", "check_test_isolation", "evaluate", "get_system", "load_eval_data",
           "predict_tasks", "provenance", "record_context", "read_predictions", "register_system", "respiramfm_system", "run"]
