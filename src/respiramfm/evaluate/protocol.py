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

**Resumable:** each (system, seed) unit writes its predictions atomically when done; a rerun
skips finished units and only recomputes the tables.
"""

from __future__ import annotations

import copy

from respiramfm.config import save_config
from respiramfm.evaluate.config import EvaluateConfig
from respiramfm.evaluate.data import EvalData, load_eval_data
from respiramfm.evaluate.efficiency import data_efficiency
from respiramfm.evaluate.layout import RunLayout
from respiramfm.evaluate.predictions import write_predictions
from respiramfm.evaluate.provenance import provenance
from respiramfm.evaluate.registry import get_system
from respiramfm.evaluate.report import build_report
from respiramfm.evaluate.results import summarise, write_tables
from respiramfm.utils.io import atomic_write_json


def system_options(cfg: EvaluateConfig, name: str) -> dict:
    """What system ``name`` receives as ``options``: its own settings, ``quick`` and the stage-2 config."""
    options = dict(cfg.systems_options.get(name) or {})
    options["quick"] = cfg.quick
    options["finetune"] = copy.deepcopy(cfg.finetune)  # the LLM baselines start from it too
    return options


def run_units(cfg: EvaluateConfig, data: EvalData, layout: RunLayout, log=print) -> None:
    """Every unfinished (system, seed) unit: fit, predict, write its predictions."""
    fns = {name: get_system(name) for name in cfg.systems}
    for seed in cfg.seeds:
        for name, fn in fns.items():
            path = layout.predictions(name, seed)
            if path.is_file():
                log(f"[evaluate] {name} seed {seed}: done earlier ({path})")
                continue
            log(f"[evaluate] {name} seed {seed}: fitting and predicting")
            preds = fn(data, int(seed), layout.work(name, seed), system_options(cfg, name))
            n = write_predictions(path, data, preds, name)
            log(f"[evaluate] {name} seed {seed}: {n} test predictions -> {path}")


def evaluate(cfg: EvaluateConfig, log=print) -> dict:
    """Run every unfinished (system, seed) unit, then write the tables (and the report)."""
    cfg.validate()
    layout = RunLayout(cfg.out_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    data = load_eval_data(cfg)
    for name in [*cfg.systems, *([cfg.data_efficiency] if cfg.data_efficiency else [])]:
        get_system(name)  # unknown names fail before any work
    save_config(cfg, layout.config)
    atomic_write_json(layout.provenance, provenance(cfg, data))
    run_units(cfg, data, layout, log)
    if cfg.data_efficiency:  # nested fractions of the training patients; resumes from its own predictions
        options = system_options(cfg, cfg.data_efficiency)
        options.pop("finetune_dir", None)  # never reuse (or overwrite) the full-data runs
        data_efficiency(data, cfg.data_efficiency, layout.efficiency(cfg.data_efficiency).root,
                        seeds=cfg.efficiency_seeds or cfg.seeds[:1],
                        fractions=cfg.efficiency_fractions, options=options, log=log)
    summary = summarise(layout, data, cfg.systems, cfg.seeds, n_boot=cfg.n_boot)
    write_tables(layout, summary)
    if cfg.report:
        summary["report"] = str(build_report(layout.root))
    return summary


__all__ = ["EvaluateConfig", "evaluate", "load_eval_data", "run_units", "system_options"]
