"""The T1-T9 protocol over systems and seeds: the orchestration of `respiramfm evaluate`.

For every seed and every system: fit on the train split of the supervised tasks, select
on validation, predict the test split of every task (supervised and zero-shot; zero-shot
tasks go through the same binary head with their own prompt). Scores are AUROC with a
patient-level bootstrap CI (:mod:`respiramfm.evaluate.metrics`), aggregated as mean ± std
over seeds (:mod:`respiramfm.evaluate.results`).

The pieces live apart: the settings in :mod:`~respiramfm.evaluate.config`, loading and the
no-test-patient guard in :mod:`~respiramfm.evaluate.data`, the systems in
:mod:`~respiramfm.evaluate.registry`, the file names in :mod:`~respiramfm.evaluate.layout`,
the prediction format in :mod:`~respiramfm.evaluate.predictions`, the command line in
:mod:`~respiramfm.evaluate.cli`.

**Paired:** every system is scored on the same test records per task (the common set of
:func:`~respiramfm.evaluate.data.load_eval_data`); a system that leaves one unscored is an error.
The tables add each system's AUROC difference to RespiraMFM with a paired patient-level CI
(:mod:`~respiramfm.evaluate.paired`).

**Every trained stage per seed:** with ``stage1_per_seed`` each seed aligns its own projector
first (:mod:`~respiramfm.evaluate.stage1`), and the data-efficiency units align on their subset.

**Resumable:** each (system, seed) unit writes its predictions atomically when done; a rerun
skips finished units (and finished stage-1 runs) and only recomputes the tables.
"""

from __future__ import annotations

import copy

from respiramfm.config import save_config
from respiramfm.errors import DataError
from respiramfm.data.tasks import rule_note
from respiramfm.evaluate.audit import audit_eval
from respiramfm.evaluate.budget import unit_budget
from respiramfm.evaluate.config import EvaluateConfig
from respiramfm.evaluate.finetune_run import apply_finetune_run
from respiramfm.evaluate.data import EvalData, check_coverage, load_eval_data
from respiramfm.evaluate.efficiency import data_efficiency
from respiramfm.evaluate.layout import RunLayout
from respiramfm.evaluate.predictions import write_predictions
from respiramfm.evaluate.provenance import provenance
from respiramfm.evaluate.registry import get_system
from respiramfm.evaluate.report import build_report
from respiramfm.evaluate.results import summarise, write_tables
from respiramfm.evaluate.stage1 import align_on, seed_data, stage1_record, uses_projector
from respiramfm.utils.io import atomic_write_json


REUSES_FINETUNE = ("respiramfm", "missing_text")  # the systems that score RespiraMFM's stage-2 model


def system_options(cfg: EvaluateConfig, name: str) -> dict:
    """What system ``name`` receives as ``options``: its own settings, ``quick`` and the stage-2 config."""
    options = dict(cfg.systems_options.get(name) or {})
    options["quick"] = cfg.quick
    options["finetune"] = copy.deepcopy(cfg.finetune)  # the LLM baselines start from it too
    options["budget"] = unit_budget(cfg, name)  # the run's one budget (or this system's explicit override)
    if cfg.finetune_run and name in REUSES_FINETUNE:  # an existing `respiramfm finetune` run stands in for training
        options.setdefault("finetune_run", cfg.finetune_run)
    return options


def run_units(cfg: EvaluateConfig, data: EvalData, layout: RunLayout, log=print) -> None:
    """Every unfinished (system, seed) unit: fit, predict, write its predictions."""
    fns = {name: get_system(name) for name in cfg.systems}
    for seed in cfg.seeds:
        pending = [name for name in fns if not layout.predictions(name, seed).is_file()]
        seeded = seed_data(cfg, data, layout, int(seed), pending, log) if pending else data
        for name, fn in fns.items():
            path = layout.predictions(name, seed)
            if path.is_file():
                log(f"[evaluate] {name} seed {seed}: done earlier ({path})")
                continue
            log(f"[evaluate] {name} seed {seed}: fitting and predicting")
            preds = fn(seeded, int(seed), layout.work(name, seed), system_options(cfg, name))
            n = write_predictions(path, data, preds, name)  # checks every prediction first
            try:
                check_coverage(data, preds, name)
            except DataError:
                path.unlink()  # an unpaired unit is not finished
                raise
            log(f"[evaluate] {name} seed {seed}: {n} test predictions -> {path}")


def _efficiency_stage1(cfg: EvaluateConfig, log=print):
    """Stage 1 of a data-efficiency unit (aligned on the unit's subset), when the run aligns per seed."""
    if not cfg.stage1_per_seed:
        return None
    quiet = copy.copy(cfg)
    quiet.align = copy.deepcopy(cfg.align)
    quiet.align.figure = False
    return lambda sub, seed, out_dir: align_on(quiet, sub, seed, out_dir, log=log)


def evaluate(cfg: EvaluateConfig, log=print) -> dict:
    """Run every unfinished (system, seed) unit, then write the tables (and the report)."""
    cfg.validate()
    apply_finetune_run(cfg)  # a reused stage-2 run brings its own projector
    layout = RunLayout(cfg.out_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    data = load_eval_data(cfg)
    for name in [*cfg.systems, *([cfg.data_efficiency] if cfg.data_efficiency else [])]:
        get_system(name)  # unknown names fail before any work
    save_config(cfg, layout.config)
    atomic_write_json(layout.provenance, provenance(cfg, data))
    note = rule_note(cfg.task_files, cfg.tasks, list(data.tasks))
    if note:
        log(f"[evaluate] {note}")
    shortcuts = audit_eval(data, log=log)  # metadata fields that alone predict a label (report warning)
    if cfg.stage1_per_seed and cfg.projector and not cfg.seed_projectors:
        log(f"[evaluate] stage1_per_seed: every seed aligns its own projector under {layout.root / 'stage1'}; "
            f"projector={cfg.projector} is not used (seed_projectors={{seed: dir}} reuses one)")
    run_units(cfg, data, layout, log)
    if cfg.data_efficiency:  # nested fractions of the training patients; resumes from its own predictions
        options = system_options(cfg, cfg.data_efficiency)
        options.pop("finetune_dir", None)  # never reuse (or overwrite) the full-data runs
        options.pop("finetune_run", None)
        data_efficiency(data, cfg.data_efficiency, layout.efficiency(cfg.data_efficiency).root,
                        seeds=cfg.efficiency_seeds or cfg.seeds[:1],
                        fractions=cfg.efficiency_fractions, options=options, log=log,
                        stage1=_efficiency_stage1(cfg, log) if uses_projector(cfg.data_efficiency) else None)
    summary = summarise(layout, data, cfg.systems, cfg.seeds, n_boot=cfg.n_boot)
    summary["stage1"] = stage1_record(cfg, layout)
    summary["shortcuts"] = shortcuts
    write_tables(layout, summary)
    if cfg.report:
        summary["report"] = str(build_report(layout.root))
    return summary


__all__ = ["EvaluateConfig", "evaluate", "load_eval_data", "run_units", "system_options"]
