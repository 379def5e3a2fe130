"""Paired comparisons: each system's AUROC difference to RespiraMFM with a paired patient-level CI.

Every system of a run is scored on the same test records per task (the common set chosen in
:func:`respiramfm.evaluate.data.load_eval_data`), so two systems can be compared record by
record. The interval of a difference comes from one patient-level bootstrap applied to BOTH
systems at once: each replicate draws patients with replacement (all their records come along),
and the statistic is ``mean over seeds AUROC(system) - mean over seeds AUROC(reference)`` on
that same resample. Drawing the two systems' resamples independently would ignore that they
were scored on the same patients and give intervals that are far too wide.

A system compared with itself has a difference of exactly 0 in every replicate, hence [0, 0].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from respiramfm.evaluate.metrics import _weighted_auroc, auroc, patient_weights, percentile_interval
from respiramfm.evaluate.predictions import read_predictions

REFERENCE = "respiramfm"


@dataclass
class AurocDifference:
    diff: float                  # mean-over-seeds AUROC of A minus that of B (NaN when undefined)
    ci_low: float
    ci_high: float
    n: int
    n_pos: int
    n_patients: int
    n_boot: int                  # replicates with both classes (others dropped)
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_auroc_difference(y_true: Sequence[int], prob_a, prob_b, patients: Sequence[str],
                               n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> AurocDifference:
    """AUROC(A) - AUROC(B) on the same records, with a paired patient-level percentile interval.

    ``prob_a`` and ``prob_b`` are (n,) or (S, n) (seeds as rows; each side's AUROC is its mean over
    rows). The same patient resample is applied to both sides in every replicate.
    """
    y = np.asarray(y_true, dtype=np.int64)
    a = np.atleast_2d(np.asarray(prob_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(prob_b, dtype=np.float64))
    if a.shape[1] != len(y) or b.shape[1] != len(y):
        raise ValueError(f"{len(y)} labels but probabilities of shape {a.shape} and {b.shape}")
    ids = np.asarray(list(patients))
    if len(ids) != len(y):
        raise ValueError(f"{len(ids)} patient ids for {len(y)} records")
    points = [auroc(y, r) for r in (*a, *b)]
    reason = next((r for _, r in points if r), "")
    diff = math.nan if reason else float(np.mean([v for v, _ in points[:len(a)]])
                                         - np.mean([v for v, _ in points[len(a):]]))
    uniq, cluster = np.unique(ids, return_inverse=True)
    out = AurocDifference(diff, math.nan, math.nan, int(len(y)), int(y.sum()), int(len(uniq)), 0, reason)
    if reason or n_boot <= 0:
        return out
    if len(uniq) < 2:
        out.reason = "one patient: no bootstrap interval"
        return out
    stats = []
    for w in patient_weights(cluster, len(uniq), n_boot, seed):
        sa = np.mean([_weighted_auroc(y, r, w) for r in a], axis=0)
        sb = np.mean([_weighted_auroc(y, r, w) for r in b], axis=0)
        stats.append(sa - sb)
    out.n_boot, out.ci_low, out.ci_high, out.reason = percentile_interval(stats, n_boot, alpha)
    return out


def _by_seed(layout, system: str, seeds: Sequence[int], task: str) -> dict[int, dict[str, dict]]:
    out = {}
    for s in seeds:
        path = layout.predictions(system, s)
        if path.is_file():
            rows = {r["record_id"]: r for r in read_predictions(path) if r["task"] == task}
            if rows:
                out[int(s)] = rows
    return out


def differences(layout, tasks: Sequence[str], systems: Sequence[str], seeds: Sequence[int], n_boot: int = 1000,
                reference: str = REFERENCE) -> list[dict]:
    """One row per (task, system != reference): the paired AUROC difference to ``reference``.

    Per task, both systems' seeds are averaged as in the main table, on the records every seed of
    both systems scored (the common test set when the run is complete).
    """
    if reference not in systems:
        return []
    rows = []
    for task in tasks:
        ref = _by_seed(layout, reference, seeds, task)
        for system in systems:
            if system == reference:
                continue
            other = _by_seed(layout, system, seeds, task)
            row = {"task": task, "system": system, "reference": reference, "diff": math.nan, "ci_low": math.nan,
                   "ci_high": math.nan, "n": 0, "n_pos": 0, "n_patients": 0, "n_boot": 0,
                   "seeds": sorted(set(ref) & set(other)) if ref and other else [], "reason": ""}
            common = sorted(set.intersection(*(set(v) for v in (*ref.values(), *other.values())))) \
                if ref and other else []
            if not common:
                row["reason"] = "no records scored by both systems"
                rows.append(row)
                continue
            first = next(iter(ref.values()))
            d = bootstrap_auroc_difference(
                [first[i]["label"] for i in common],
                [[v[i]["prob"] for i in common] for v in other.values()],
                [[v[i]["prob"] for i in common] for v in ref.values()],
                [first[i]["patient"] for i in common], n_boot=n_boot, seed=0)
            row.update({k: v for k, v in d.to_dict().items()})
            rows.append(row)
    return rows


def _cell(r: dict) -> str:
    if not np.isfinite(r["diff"]):
        return "–"
    ci = f" [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" if np.isfinite(r["ci_low"]) else ""
    return f"{r['diff']:+.3f}{ci}"


def differences_markdown(summary: dict) -> str:
    """The table of paired differences (empty string when the run has no reference system)."""
    rows = summary.get("differences") or []
    if not rows:
        return ""
    ref = rows[0]["reference"]
    systems = [s for s in summary["systems"] if s != ref]
    lookup = {(r["task"], r["system"]): r for r in rows}
    lines = [f"AUROC difference to {ref} (system − {ref}; mean over seeds), [95% paired CI: one patient-level "
             f"bootstrap resample applied to both systems, {summary['n_boot']} resamples]. An interval that "
             "excludes 0 marks a difference the test set resolves.", "",
             "| Task | n (pos) | " + " | ".join(systems) + " |", "|---|---|" + "---|" * len(systems)]
    for task in summary["tasks"]:
        rs = [lookup.get((task, s)) for s in systems]
        counts = next((f"{r['n']} ({r['n_pos']})" for r in rs if r and r["n"]), "–")
        lines.append(f"| {task} | {counts} | " + " | ".join(_cell(r) if r else "–" for r in rs) + " |")
    notes = [f"- {r['task']} / {r['system']}: {r['reason']}" for r in rows if r["reason"]]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


__all__ = ["AurocDifference", "REFERENCE", "bootstrap_auroc_difference", "differences", "differences_markdown"]
