"""One training budget for every trained system of an evaluation run, and the record of what each used.

The budget (:class:`respiramfm.training.config.Budget`: optimiser, betas, weight decay, schedule and
warm-up, clipping, epochs, batch, accumulation, validation cadence, selection, patience and task
mixing) is ``EvaluateConfig.budget``; when that is ``null`` it is read off the ``finetune`` section
(the RespiraMFM stage-2 keys ``optim``, ``epochs``, ``max_steps``, ``batch_size``, ``grad_accum``,
``eval_every``, ``select_metric``, ``patience``, ``mixing``). Every LLM system (RespiraMFM, its
modes, RespLLM and both no-alignment ablations) trains with it. A system trains with another budget
only when the config says so explicitly, under ``systems_options: {NAME: {budget: {...}}}`` (the
keys given replace the shared ones); a budget key written anywhere else in a system's options is
refused. ``quick`` caps every system's epochs at :data:`QUICK_EPOCHS`, the same for all.

Each unit writes ``budget.json`` next to its training files (``RunLayout.work(system, seed)``):
the budget it trained with, the shared one, the override (if any), or, for a system that is not
trained by gradient descent (``bts_frozen``), a note saying so. :func:`budget_rows` and
:func:`budget_markdown` read them back for reports.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from respiramfm.config import from_dict, to_dict
from respiramfm.errors import ConfigError, DataError
from respiramfm.fusion.train_config import SELECT_KEYS, FinetuneConfig, finetune_budget
from respiramfm.training.config import Budget
from respiramfm.utils.io import atomic_write_json

BUDGET_FILE = "budget.json"
QUICK_EPOCHS = 2
# FinetuneConfig keys that make up its budget (the rest is the model, the data and how the run is carried out)
FINETUNE_KEYS = ("optim", "epochs", "max_steps", "batch_size", "grad_accum", "eval_every", "select_metric",
                 "patience", "mixing")
_SELECT = {v: k for k, v in SELECT_KEYS.items()}  # (row key, mode) -> FinetuneConfig.select_metric


def budget_of(ft: FinetuneConfig) -> Budget:
    """The budget a stage-2 config trains with (a copy of :func:`~respiramfm.fusion.train_config.finetune_budget`)."""
    return copy.deepcopy(finetune_budget(ft))


def check_budget(budget: Budget, where: str = "budget") -> Budget:
    """``budget`` validated for the LLM systems (selection on validation AUROC or loss, steps as cadence unit)."""
    try:
        budget.validate()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if (budget.select_metric, budget.select_mode) not in _SELECT:
        raise ConfigError(f"{where}: select_metric/select_mode must be val_mean_auroc/max or val_loss/min (every "
                          f"system is selected on validation), got ({budget.select_metric!r}, "
                          f"{budget.select_mode!r}); a budget section names every key (configs/evaluate.yaml)")
    if budget.eval_unit != "step" and budget.eval_every:
        raise ConfigError(f"{where}: eval_every counts optimiser steps (eval_unit: step); 0 = every epoch end")
    return budget


def apply_budget(ft: FinetuneConfig, budget: Budget) -> FinetuneConfig:
    """A copy of ``ft`` whose budget keys are ``budget``'s (the model and run settings are kept)."""
    check_budget(budget)
    out = copy.deepcopy(ft)
    out.optim = copy.deepcopy(budget.optim)
    for name in ("epochs", "max_steps", "batch_size", "grad_accum", "eval_every", "patience", "mixing"):
        setattr(out, name, getattr(budget, name))
    out.select_metric = _SELECT[(budget.select_metric, budget.select_mode)]
    return out


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def conflicts(ft: FinetuneConfig, budget: Budget) -> list[str]:
    """``finetune`` budget keys set (away from their defaults) to something else than ``budget`` says."""
    default = _flat({k: to_dict(getattr(FinetuneConfig(), k)) for k in FINETUNE_KEYS})
    mine = _flat({k: to_dict(getattr(ft, k)) for k in FINETUNE_KEYS})
    want = _flat({k: to_dict(getattr(apply_budget(FinetuneConfig(), budget), k)) for k in FINETUNE_KEYS})
    return [f"finetune.{k}={mine[k]!r} (budget: {want[k]!r})" for k in sorted(mine)
            if mine[k] != default[k] and mine[k] != want[k]]


def merged(budget: Budget, override: dict | None, where: str) -> Budget:
    """``budget`` with the keys of ``override`` (a partial mapping, ``optim`` merged key by key) replaced."""
    if not override:
        return copy.deepcopy(budget)
    if not isinstance(override, dict):
        raise ConfigError(f"{where}: expected a mapping of budget keys, got {override!r}")
    tree = to_dict(budget)
    for k, v in override.items():
        if k == "optim" and isinstance(v, dict):
            tree["optim"].update(v)
        else:
            tree[k] = v
    return check_budget(from_dict(Budget, tree, where=where), where)


def refuse_implicit(options: dict, system: str) -> None:
    """A budget key in a system's options outside ``budget:`` would give it its own budget silently: refused."""
    for key in options:
        head = str(key).split(".")[0]
        if head == "e2e":
            raise ConfigError(f"systems_options.{system}.e2e: the end-to-end systems train with the run's shared "
                              f"budget now; an explicit override goes under systems_options.{system}.budget")
        if head in FINETUNE_KEYS:
            raise ConfigError(f"systems_options.{system}.{key} would train {system} with its own budget; the budget "
                              f"is shared by every system (EvaluateConfig.budget), and an override must be written "
                              f"explicitly as systems_options.{system}.budget")


@dataclass
class UnitBudget:
    """What one system trains with, and why: the shared budget, an explicit override, the quick cap."""

    budget: Budget
    shared: Budget
    override: dict = field(default_factory=dict)
    quick_capped: bool = False

    def record(self, system: str) -> dict:
        return {"system": system, "trained_with_budget": True, "budget": to_dict(self.budget),
                "shared": to_dict(self.shared), "override": self.override or None,
                "quick_capped": self.quick_capped, "same_as_shared": to_dict(self.budget) == to_dict(self.shared)}


def resolve(shared: Budget, override: dict | None, quick: bool, system: str) -> UnitBudget:
    """``shared`` with ``system``'s explicit override, then capped at :data:`QUICK_EPOCHS` when ``quick``."""
    budget = merged(check_budget(copy.deepcopy(shared), "budget"), override,
                    where=f"systems_options.{system}.budget")
    capped = bool(quick) and budget.epochs > QUICK_EPOCHS
    shared = copy.deepcopy(shared)
    if quick:
        budget.epochs, shared.epochs = min(budget.epochs, QUICK_EPOCHS), min(shared.epochs, QUICK_EPOCHS)
    return UnitBudget(budget, shared, dict(override or {}), capped)


def shared_budget(cfg) -> Budget:
    """An :class:`~respiramfm.evaluate.config.EvaluateConfig`'s shared budget (``budget``, else ``finetune``'s)."""
    return copy.deepcopy(cfg.budget) if cfg.budget is not None else budget_of(cfg.finetune)


def unit_budget(cfg, system: str) -> UnitBudget:
    """The budget ``system`` trains with in the run ``cfg`` (an EvaluateConfig)."""
    options = cfg.systems_options.get(system) or {}
    return resolve(shared_budget(cfg), options.get("budget"), cfg.quick, system)


def options_budget(options: dict, system: str) -> UnitBudget:
    """The :class:`UnitBudget` a system function receives in ``options["budget"]`` (the protocol puts it
    there); called directly, ``options["budget"]`` may be a partial mapping over ``options["finetune"]``'s."""
    given = options.get("budget")
    if isinstance(given, UnitBudget):
        return given
    base = options.get("finetune")
    if isinstance(base, dict):
        base = from_dict(FinetuneConfig, base, where="options.finetune")
    return resolve(budget_of(base if base is not None else FinetuneConfig()), given, bool(options.get("quick")),
                   system)


def check_trained(ft: FinetuneConfig, unit: UnitBudget, system: str, where: str = "") -> UnitBudget:
    """``unit`` when the finished stage-2 run ``ft`` trained with its budget; a ConfigError otherwise."""
    have, want = _flat(to_dict(budget_of(ft))), _flat(to_dict(unit.budget))
    diff = sorted(k for k in want if have.get(k) != want[k])
    if diff:
        raise ConfigError(f"{system}: the finished stage-2 run trained with another budget than the run's "
                          f"({', '.join(f'{k}: {have.get(k)!r} vs {want[k]!r}' for k in diff)})", path=where or None)
    return unit


def pipeline_budget(given: Budget | None, ft: FinetuneConfig, quick: bool = False) -> Budget:
    """The pipeline's shared budget: its stage 2 (``ft``, quick cap applied) is the evaluation's RespiraMFM,
    so the budget is ``ft``'s; an ``evaluate.budget`` that says otherwise is refused, never ignored."""
    own = budget_of(ft)
    if given is not None:
        given = resolve(given, None, quick, "respiramfm").budget
    if given is not None and to_dict(given) != to_dict(own):
        diff = sorted(k for k, v in _flat(to_dict(given)).items() if _flat(to_dict(own)).get(k) != v)
        raise ConfigError(f"evaluate.budget differs from the pipeline's stage-2 settings in {diff}: in the pipeline "
                          "every system trains with stage 2's budget (finetune.optim, finetune.epochs, ...); set it "
                          "there and leave evaluate.budget null (--set evaluate.budget=null)")
    return own


def quick_finetune(ft: FinetuneConfig, quick: bool) -> FinetuneConfig:
    """``ft`` with the quick cap every evaluated system gets (so a pipeline's stage 2 matches them)."""
    return apply_budget(ft, resolve(budget_of(ft), None, quick, "respiramfm").budget) if quick else ft


def write_budget(work_dir, system: str, unit: UnitBudget | None, note: str = "") -> Path:
    """``work_dir/budget.json``: the unit's budget record (``unit=None``: not trained with the budget)."""
    record = unit.record(system) if unit is not None else {"system": system, "trained_with_budget": False,
                                                           "budget": None, "note": note}
    path = Path(work_dir) / BUDGET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return path


def read_budget(work_dir) -> dict | None:
    path = Path(work_dir) / BUDGET_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable budget record ({exc})", path=str(path)) from None


def budget_rows(layout, systems, seeds) -> list[dict]:
    """One row per system: the budget its units trained with (units that disagree are listed apart)."""
    rows = []
    for system in systems:
        records = {int(s): read_budget(layout.work(system, s)) for s in seeds}
        found = {s: r for s, r in records.items() if r is not None}
        if not found:
            rows.append({"system": system, "seeds": [], "record": None})
            continue
        kinds: dict[str, list[int]] = {}
        for s, r in found.items():
            kinds.setdefault(json.dumps(r.get("budget"), sort_keys=True), []).append(s)
        for key, ss in kinds.items():
            rows.append({"system": system, "seeds": sorted(ss), "record": found[ss[0]]})
    return rows


def describe(record: dict | None) -> str:
    """One line for a budget record: optimiser, lr, schedule, batch, epochs, cadence, patience, mixing."""
    if record is None:
        return "no budget record"
    b = record.get("budget")
    if not b:
        return f"not budget-trained: {record.get('note', '')}".strip()
    o = b["optim"]
    warm = f" + {o['warmup_steps']} warm-up steps" if o.get("warmup_steps") else ""
    clip = f", clip {o['max_grad_norm']:g}" if o.get("max_grad_norm") else ""
    cadence = f"every {b['eval_every']} steps" if b.get("eval_every") else "every epoch"
    text = (f"{o['optimizer']} lr {o['lr']:g} betas {o['betas'][0]:g}/{o['betas'][1]:g} wd {o['weight_decay']:g}, "
            f"{o['schedule']}{warm}{clip}; batch {b['batch_size']}x{b['grad_accum']}, {b['epochs']} epochs"
            f"{', max ' + str(b['max_steps']) + ' steps' if b.get('max_steps') else ''}; validation {cadence} "
            f"on {b['select_metric']} ({b['select_mode']}), patience {b['patience']}; mixing {b['mixing']}")
    if record.get("override"):
        text += f" [explicit override: {json.dumps(record['override'], sort_keys=True)}]"
    return text


def budget_markdown(rows: list[dict]) -> str:
    """The budgets as a Markdown table (one line per system, or per group of seeds that differ)."""
    lines = ["| System | Seeds | Budget |", "|---|---|---|"]
    for r in rows:
        seeds = ", ".join(map(str, r["seeds"])) or "-"
        lines.append(f"| {r['system']} | {seeds} | {describe(r['record'])} |")
    return "\n".join(lines) + "\n"


__all__ = ["BUDGET_FILE", "FINETUNE_KEYS", "QUICK_EPOCHS", "UnitBudget", "apply_budget", "budget_markdown",
           "budget_of", "budget_rows", "check_budget", "check_trained", "conflicts", "describe", "merged", "options_budget", "pipeline_budget", "quick_finetune",
           "read_budget", "refuse_implicit", "resolve", "shared_budget", "unit_budget", "write_budget"]
