"""Data-efficiency curve: retrain a system on nested fractions of the training PATIENTS.

For each seed, the training patients of every dataset are shuffled once (seeded) and
the first ``ceil(f * n)`` of them (at least one) form the subset for fraction ``f``,
so the subsets are **nested** (1% ⊂ 5% ⊂ ... ⊂ 100%) and every dataset keeps data.
Validation and test records are never subsampled: selection still runs on the full
validation split and scores on the full test split. Each subset is written as its own
manifest (audio paths re-anchored) and the chosen protocol system is retrained on it
through the protocol's own ``fit_predict`` interface. When the run aligns per seed
(``stage1``, see :mod:`respiramfm.evaluate.stage1`), stage 1 is subsampled with stage 2: each unit's
projector is aligned on the same patient subset before the system is retrained.

Outputs in ``out_dir`` (named by :class:`respiramfm.evaluate.layout.EfficiencyLayout`):
``data_efficiency.json`` (the protocol report's plot format plus per-task values and failures),
``data_efficiency.md`` (table), and per (fraction, seed) the unit's manifest, work folder and
predictions (the protocol's prediction format) — an existing prediction file is reused (resume).
A unit that fails (e.g. a 1% subset holding a single class) is reported, not fatal.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from respiramfm.evaluate.data import write_records_manifest
from respiramfm.errors import RespiraMFMError
from respiramfm.evaluate.layout import EfficiencyLayout
from respiramfm.evaluate.metrics import auroc
from respiramfm.evaluate.predictions import by_task, read_predictions, write_predictions
from respiramfm.evaluate.registry import get_system
from respiramfm.utils.io import atomic_write_json, atomic_write_text

FRACTIONS = (0.01, 0.05, 0.10, 0.25, 0.50, 1.0)


def nested_subsets(records: Sequence, fractions: Sequence[float], seed: int) -> dict[float, set[tuple[str, str]]]:
    """{fraction: set of (dataset, patient_id)} of TRAINING patients, nested across fractions."""
    per_dataset: dict[str, list[str]] = {}
    for r in records:
        if r.split == "train":
            per_dataset.setdefault(r.dataset, [])
            if r.patient_id not in per_dataset[r.dataset]:
                per_dataset[r.dataset].append(r.patient_id)
    orders = {}
    for d in sorted(per_dataset):
        patients = sorted(per_dataset[d])
        rng = np.random.default_rng([int(seed), 1009, *[ord(c) for c in d]])
        orders[d] = [patients[i] for i in rng.permutation(len(patients))]
    out = {}
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {f!r}")
        out[float(f)] = {(d, p) for d, order in orders.items() for p in order[:max(1, math.ceil(f * len(order)))]}
    return out


def subset_data(data, keep: set[tuple[str, str]], manifest: Path):
    """A copy of the protocol's EvalData whose train split holds only ``keep``'s patients (written to ``manifest``)."""
    chosen = [r for r in data.records if r.split != "train" or (r.dataset, r.patient_id) in keep]
    kept = write_records_manifest(data, chosen, manifest)
    return replace(data, records=kept, manifests=[str(manifest)])


def task_aurocs(data, preds: dict[str, dict[str, float]], tasks: Sequence[str]) -> dict[str, float]:
    """Test AUROC per task from {task: {record_id: prob}} (NaN when a class is missing or nothing scored)."""
    test = data.split("test")
    out = {}
    for name in tasks:
        pairs = [(y, preds.get(name, {})[r.record_id]) for r, y in data.tasks[name].select(test)
                 if r.record_id in preds.get(name, {})]
        out[name] = auroc([y for y, _ in pairs], [p for _, p in pairs])[0] if pairs else math.nan
    return out


def data_efficiency(data, system: str, out_dir, seeds: Sequence[int] = (0,), fractions: Sequence[float] = FRACTIONS,
                    options: dict | None = None, fit_predict=None, log=print, stage1=None) -> dict:
    """Retrain ``system`` (a registered protocol system, or ``fit_predict``) per fraction and seed.

    ``stage1(subset_data, seed, out_dir) -> projector dir``, when given, aligns each unit's projector
    on the unit's patient subset (``EfficiencyLayout.stage1``) and the system is trained with it.
    """
    fit_predict = fit_predict or get_system(system)
    layout = EfficiencyLayout(Path(out_dir))
    tasks = list(data.supervised)
    results: dict[float, dict[int, dict]] = {}
    failures = []
    for seed in seeds:
        subsets = nested_subsets(data.records, fractions, seed)
        for f in fractions:
            pred_path = layout.predictions(f, seed)
            if not pred_path.is_file():
                sub = subset_data(data, subsets[float(f)], layout.manifest(f, seed))
                log(f"[data-efficiency] {system} fraction {f:g} seed {seed}: "
                    f"{len(subsets[float(f)])} training patients")
                try:
                    if stage1 is not None:
                        sub = replace(sub, projector=stage1(sub, int(seed), layout.stage1(f, seed)))
                    found = fit_predict(sub, int(seed), layout.work(f, seed), dict(options or {}))
                except RespiraMFMError as exc:
                    failures.append({"fraction": f, "seed": seed, "error": str(exc)})
                    log(f"[data-efficiency] fraction {f:g} seed {seed} failed: {exc}")
                    continue
                write_predictions(pred_path, data, found, system)
            preds = by_task(read_predictions(pred_path))
            per_task = task_aurocs(data, preds, tasks)
            vals = [v for v in per_task.values() if np.isfinite(v)]
            results.setdefault(float(f), {})[int(seed)] = {
                "per_task": per_task, "mean": float(np.mean(vals)) if vals else math.nan,
                "n_patients": len(subsets[float(f)])}
    means, stds, table = [], [], []
    for f in fractions:
        runs = results.get(float(f), {})
        m = [r["mean"] for r in runs.values() if np.isfinite(r["mean"])]
        means.append(float(np.mean(m)) if m else None)
        stds.append(float(np.std(m, ddof=1)) if len(m) > 1 else (0.0 if m else None))
        per_task = {t: _mean([r["per_task"][t] for r in runs.values()]) for t in tasks}
        table.append({"fraction": f, "n_runs": len(m), "mean": means[-1], "std": stds[-1], "per_task": per_task,
                      "n_patients": _mean([r["n_patients"] for r in runs.values()])})
    payload = {"simulated": bool(getattr(data, "simulated", False)), "fractions": [float(f) for f in fractions],
               "systems": {system: {"mean": means, "std": stds}}, "metric": "mean supervised AUROC",
               "unit": "fraction of training patients (nested, per dataset)", "seeds": list(seeds),
               "table": table, "failures": failures}
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.summary, payload)
    atomic_write_text(layout.table, _markdown(system, tasks, table, payload["simulated"]))
    return payload


def _mean(values):
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def _markdown(system: str, tasks: list[str], table: list[dict], simulated: bool) -> str:
    head = f"# Data efficiency: {system}{' (SIMULATED data)' if simulated else ''}\n\n"
    cols = ["fraction", "train patients", "mean AUROC", "std", *tasks]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        cells = [f"{row['fraction']:g}", _fmt(row["n_patients"]).rstrip("0").rstrip("."), _fmt(row["mean"]),
                 _fmt(row["std"]), *[_fmt(row["per_task"][t]) for t in tasks]]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


__all__ = ["FRACTIONS", "data_efficiency", "nested_subsets", "subset_data", "task_aurocs"]
