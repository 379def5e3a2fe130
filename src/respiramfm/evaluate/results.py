"""Aggregate per-seed predictions into the paper's tables (results.csv / .json / .md).

Per (task, system): the AUROC of every seed, their mean ± std, and a 95% CI of the
*seed-mean* AUROC from a patient-level bootstrap (one resample of patients is applied
to every seed's predictions at once, on the records all seeds scored). Group averages
(supervised, zero-shot) are the mean over tasks of the seed-mean AUROC, with the std
over seeds of the per-seed group average.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from respiramfm.evaluate.audit import shortcut_section
from respiramfm.evaluate.layout import RunLayout
from respiramfm.evaluate.metrics import auroc, bootstrap_auroc, format_mean_std, mean_std
from respiramfm.evaluate.operating import (OP_CSV_FIELDS, operating_csv, operating_table, saved_threshold,
                                           with_operating_points)
from respiramfm.evaluate.paired import differences, differences_markdown
from respiramfm.evaluate.predictions import read_predictions
from respiramfm.utils.io import atomic_write_json, atomic_write_text, csv_row

SIM_NOTE = "SIMULATED data: synthetic cohort, no evidence about real patients"


def summarise(out: RunLayout | Path, data, systems: list[str], seeds: list[int], n_boot: int = 1000) -> dict:
    """The per-(task, system) rows and group averages of the run's prediction files."""
    layout = out if isinstance(out, RunLayout) else RunLayout(out)
    rows = []
    per_seed_avg: dict[str, dict[str, dict[int, list[float]]]] = {}
    for system in systems:
        preds = {s: read_predictions(layout.predictions(system, s)) for s in seeds
                 if layout.predictions(system, s).is_file()}
        for name, task in data.tasks.items():
            group = "supervised" if task.role == "supervised" else "zero-shot"
            n_test = len(task.select(data.split("test")))
            by_seed = {s: {r["record_id"]: r for r in rows_ if r["task"] == name} for s, rows_ in preds.items()}
            by_seed = {s: v for s, v in by_seed.items() if v}
            row = {"task": name, "group": group, "system": system, "dataset": task.dataset,
                   "simulated": bool(task.simulated or task.dataset.startswith("sim")), "n_test": n_test,
                   "seeds": sorted(by_seed), "auroc_per_seed": {}, "mean": math.nan, "std": math.nan,
                   "ci_low": math.nan, "ci_high": math.nan, "n": 0, "n_pos": 0, "n_patients": 0, "missing": n_test,
                   "reason": "no predictions" if not by_seed else ""}
            if by_seed:
                for s, recs in by_seed.items():
                    v, reason = auroc([r["label"] for r in recs.values()], [r["prob"] for r in recs.values()])
                    row["auroc_per_seed"][s] = v
                    row["reason"] = row["reason"] or reason
                    per_seed_avg.setdefault(system, {}).setdefault(group, {}).setdefault(s, []).append(v)
                row["mean"], row["std"], _ = mean_std(list(row["auroc_per_seed"].values()))
                common = sorted(set.intersection(*(set(v) for v in by_seed.values())))
                first = by_seed[next(iter(by_seed))]
                y = [first[i]["label"] for i in common]
                probs = np.array([[by_seed[s][i]["prob"] for i in common] for s in by_seed])
                patients = [first[i]["patient"] for i in common]
                if common:
                    b = bootstrap_auroc(y, probs, patients, n_boot=n_boot, seed=0)
                    row.update(ci_low=b.ci_low, ci_high=b.ci_high, n=b.n, n_pos=b.n_pos, n_patients=b.n_patients)
                    row["reason"] = row["reason"] or b.reason
                    with_operating_points(row, y, probs, patients, n_boot,
                                          [saved_threshold(layout, system, s, name) for s in by_seed])
                row["missing"] = n_test - max(len(v) for v in by_seed.values())
            rows.append(row)
    averages = {}
    for system in systems:
        for group in ("supervised", "zero-shot"):
            means = [r["mean"] for r in rows if r["system"] == system and r["group"] == group]
            m = float(np.nanmean(means)) if any(np.isfinite(means)) else math.nan
            seed_avgs = [float(np.nanmean(v)) for v in per_seed_avg.get(system, {}).get(group, {}).values()
                         if np.isfinite(v).any()]
            averages.setdefault(system, {})[group] = {"mean": m, "std": mean_std(seed_avgs)[1] if seed_avgs else math.nan,
                                                      "n_tasks": int(np.isfinite(means).sum())}
    excluded = getattr(data, "excluded", [])
    paired = {"n_excluded": len(excluded), "excluded": excluded[:50],
              "n_per_task": {name: len(t.select(data.split("test"))) for name, t in data.tasks.items()}}
    return {"rows": rows, "averages": averages, "systems": list(systems), "seeds": list(seeds),
            "tasks": list(data.tasks), "simulated": data.simulated, "n_boot": n_boot, "paired": paired,
            "differences": differences(layout, list(data.tasks), systems, seeds, n_boot=n_boot)}


def _fmt_ci(r: dict) -> str:
    if not np.isfinite(r["ci_low"]):
        return ""
    return f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def _paired_note(summary: dict) -> list[str]:
    """The sentence saying every system was scored on the same test records (and what was left out)."""
    paired = summary.get("paired")
    if not paired:
        return []
    out = "Every system is scored on the same test records of each task (n in the table)"
    if paired["n_excluded"]:
        out += (f"; {paired['n_excluded']} test record(s) without a usable audio embedding are left out for every "
                "system (results.json: paired.excluded)")
    if summary.get("stage1", {}).get("per_seed") is False:
        out += ". One stage-1 projector serves every seed: the ± covers stage 2 only"
    elif summary.get("stage1", {}).get("per_seed"):
        out += ". Every seed re-trains stage 1 (its own projector) and stage 2"
    return [out + ".", ""]


def markdown_table(summary: dict) -> str:
    systems, rows = summary["systems"], summary["rows"]
    lookup = {(r["task"], r["system"]): r for r in rows}
    lines = []
    if summary["simulated"]:
        lines += [f"**{SIM_NOTE}.**", ""]
    lines += [f"AUROC, mean ± std over seeds {summary['seeds']}; [95% CI of the seed mean, patient-level "
              f"bootstrap, {summary['n_boot']} resamples].", ""]
    lines += _paired_note(summary)
    lines.append("| Task | Role | n (pos) | " + " | ".join(systems) + " |")
    lines.append("|---|---|---|" + "---|" * len(systems))
    for group in ("supervised", "zero-shot"):
        for task in summary["tasks"]:
            rs = [lookup.get((task, s)) for s in systems]
            if not rs or rs[0] is None or rs[0]["group"] != group:
                continue
            counts = next((f"{r['n']} ({r['n_pos']})" for r in rs if r and r["n"]), "–")
            tag = " (SIMULATED)" if rs[0]["simulated"] else ""
            cells = [format_mean_std(r["mean"], r["std"]) + _fmt_ci(r) if r else "–" for r in rs]
            lines.append(f"| {task}{tag} | {group} | {counts} | " + " | ".join(cells) + " |")
        avg = [summary["averages"][s][group] for s in systems]
        if any(a["n_tasks"] for a in avg):
            lines.append(f"| **Avg {group}** | | | " + " | ".join(
                format_mean_std(a["mean"], a["std"]) + f" ({a['n_tasks']} tasks)" for a in avg) + " |")
    notes = [f"- {r['task']} / {r['system']}: {r['reason']}" for r in rows if r["reason"]]
    notes += [f"- {r['task']} / {r['system']}: {r['missing']} test record(s) not scored" for r in rows
              if r["missing"] and r["seeds"]]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def write_tables(out: RunLayout | Path, summary: dict) -> None:
    """``results.csv``, ``results.json`` and ``results.md`` of the run."""
    layout = out if isinstance(out, RunLayout) else RunLayout(out)
    fields = ["task", "group", "system", "dataset", "simulated", "mean", "std", "ci_low", "ci_high", "n", "n_pos",
              "n_patients", "n_test", "missing", "seeds", "auroc_per_seed", "reason", *OP_CSV_FIELDS]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in summary["rows"]:
        w.writerow(csv_row({**r, **operating_csv(r), "seeds": " ".join(map(str, r["seeds"])),
                            "auroc_per_seed": " ".join(f"{s}:{v:.6f}" for s, v in r["auroc_per_seed"].items())}))
    for system, groups in summary["averages"].items():
        for group, a in groups.items():
            w.writerow(csv_row({"task": f"avg-{group}", "group": group, "system": system, "mean": a["mean"],
                                "std": a["std"], "reason": f"mean over {a['n_tasks']} task(s)"}))
    atomic_write_text(layout.results_csv, buf.getvalue())
    atomic_write_json(layout.results_json, _jsonable(summary))
    title = "# RespiraMFM evaluation" + (" (SIMULATED)" if summary["simulated"] else "") + "\n\n"
    atomic_write_text(layout.results_md, title + markdown_table(summary) + _differences_section(summary)
                       + operating_table(summary) + shortcut_section(summary))


def _differences_section(summary: dict) -> str:
    table = differences_markdown(summary)
    return f"\n## Paired differences to {summary['differences'][0]['reference']}\n\n{table}" if table else ""


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


__all__ = ["SIM_NOTE", "markdown_table", "summarise", "write_tables"]
