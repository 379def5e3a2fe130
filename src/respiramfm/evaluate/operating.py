"""Operating points, calibration and decision thresholds, with patient-level bootstrap intervals.

A screening model is read by what it does at a threshold, not only by its AUROC. Per task:

* ``sens_at_spec90`` / ``sens_at_spec95``: the highest sensitivity among the thresholds whose
  specificity is at least 90 % / 95 % (a threshold means "positive when p >= t");
* ``spec_at_sens90``: the highest specificity among the thresholds whose sensitivity is at least 90 %;
* ``brier``: the mean squared difference between the probability and the 0/1 label;
* ``ece``: expected calibration error over :data:`ECE_BINS` equal-width probability bins on [0, 1]
  (the last bin includes 1.0): the record-weighted mean over bins of |fraction positive - mean
  probability|.

Each comes with a percentile interval from the same patient-level bootstrap as the AUROC
(:func:`respiramfm.evaluate.metrics.patient_weights`: patients drawn with replacement bring all
their records). Every statistic is computed on weighted records, so one replicate is a few
vector operations for all five numbers.

Decision thresholds (:func:`choose_threshold`) are picked on *validation* predictions only:
``youden`` maximises sensitivity + specificity - 1; ``sensitivity`` takes the highest threshold
whose sensitivity reaches ``target`` (the most specific one that still finds that share of cases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from respiramfm.errors import ConfigError
from respiramfm.evaluate.metrics import patient_weights

ECE_BINS = 10
SPEC_TARGETS = (0.90, 0.95)
SENS_TARGET = 0.90
POINTS = ("sens_at_spec90", "sens_at_spec95", "spec_at_sens90", "brier", "ece")
LABELS = {"sens_at_spec90": "Sens @ 90% spec", "sens_at_spec95": "Sens @ 95% spec",
          "spec_at_sens90": "Spec @ 90% sens", "brier": "Brier", "ece": f"ECE ({ECE_BINS} bins)"}
RULES = ("youden", "sensitivity")
EPS = 1e-12


@dataclass
class ThresholdConfig:
    """How stage 2 picks each task's decision threshold on validation predictions."""

    rule: str = "youden"      # youden | sensitivity
    target: float = 0.9       # sensitivity rule: the sensitivity the threshold must reach on validation

    def validate(self) -> "ThresholdConfig":
        if self.rule not in RULES:
            raise ConfigError(f"threshold.rule must be one of {RULES}, got {self.rule!r}")
        if not 0.0 < float(self.target) <= 1.0:
            raise ConfigError(f"threshold.target must be in (0, 1], got {self.target!r}")
        return self


def _arrays(y_true, prob) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(prob, dtype=np.float64)
    if y.ndim != 1 or p.shape[-1] != y.shape[0]:
        raise ValueError(f"labels {y.shape} and probabilities {p.shape} must have equal length")
    return y, p


def _weighted(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Every operating point for each row of the weight matrix ``w`` (B, n)."""
    order = np.argsort(-p, kind="mergesort")
    ps, ys, ws = p[order], y[order], w[:, order]
    ends = np.r_[np.flatnonzero(ps[1:] != ps[:-1]), len(ps) - 1]       # last record of each distinct score
    tp = np.cumsum(ws * (ys == 1), axis=1)[:, ends]                     # (B, G): positives at p >= score
    fp = np.cumsum(ws * (ys == 0), axis=1)[:, ends]
    n_pos, n_neg = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(n_pos > 0, tp / n_pos, np.nan)
        spec = np.where(n_neg > 0, 1.0 - fp / n_neg, np.nan)
        tpr = np.concatenate([np.zeros_like(tpr[:, :1]), tpr], axis=1)  # the threshold above every score
        spec = np.concatenate([np.where(n_neg > 0, 1.0, np.nan), spec], axis=1)
        out = {}
        for t in SPEC_TARGETS:
            ok = spec >= t - EPS
            out[f"sens_at_spec{round(t * 100)}"] = np.where(ok, tpr, -np.inf).max(axis=1)
        ok = tpr >= SENS_TARGET - EPS
        out[f"spec_at_sens{round(SENS_TARGET * 100)}"] = np.where(ok, spec, -np.inf).max(axis=1)
        defined = (n_pos[:, 0] > 0) & (n_neg[:, 0] > 0)
        for k in list(out):
            out[k] = np.where(defined & np.isfinite(out[k]), out[k], np.nan)
        total = w.sum(axis=1)
        out["brier"] = (w * (p - y) ** 2).sum(axis=1) / total
        onehot = np.eye(ECE_BINS)[np.clip((p * ECE_BINS).astype(int), 0, ECE_BINS - 1)]  # (n, K)
        gap = np.abs((w * y) @ onehot - (w * p) @ onehot)                               # (B, K)
        out["ece"] = gap.sum(axis=1) / total
    return out


def operating_points(y_true: Sequence[int], prob, patients: Sequence[str] | None = None, n_boot: int = 1000,
                     seed: int = 0, alpha: float = 0.05, chunk: int = 250) -> dict:
    """Every point of :data:`POINTS` with its ``1 - alpha`` patient-level bootstrap interval.

    ``prob`` is (n,) or (S, n) (several seeds scoring the same records: each statistic is the mean
    over rows, and each replicate resamples all rows alike, as :func:`bootstrap_auroc` does).
    Returns ``{name: {"value", "ci_low", "ci_high"}, "n", "n_pos", "n_patients", "n_boot",
    "ece_bins", "reason"}``; NaN where undefined (one class only: sensitivity/specificity).
    """
    y, p = _arrays(y_true, prob)
    rows = p[None] if p.ndim == 1 else p
    if not np.isfinite(rows).all():
        raise ValueError("non-finite probabilities")
    ids = np.asarray(patients if patients is not None else np.arange(len(y)).astype(str))
    if len(ids) != len(y):
        raise ValueError(f"{len(ids)} patient ids for {len(y)} records")
    uniq, cluster = np.unique(ids, return_inverse=True)
    out: dict = {"n": int(len(y)), "n_pos": int(y.sum()), "n_patients": int(len(uniq)), "n_boot": 0,
                 "ece_bins": ECE_BINS, "reason": ""}
    if len(y) == 0:
        out["reason"] = "no samples"
        out.update({k: {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan} for k in POINTS})
        return out
    ones = np.ones((1, len(y)))
    point = {k: float(np.mean([_weighted(y, r, ones)[k][0] for r in rows])) for k in POINTS}
    if out["n_pos"] in (0, len(y)):
        out["reason"] = f"only one class present (n={len(y)}): sensitivity and specificity undefined"
    stats: dict[str, list] = {k: [] for k in POINTS}
    if n_boot > 0 and len(uniq) >= 2:
        for w in patient_weights(cluster, len(uniq), n_boot, seed, chunk):
            per_row = [_weighted(y, r, w) for r in rows]
            for k in POINTS:
                stats[k].append(np.mean([d[k] for d in per_row], axis=0))
    elif n_boot > 0:
        out["reason"] = out["reason"] or "one patient: no bootstrap interval"
    for k in POINTS:
        s = np.concatenate(stats[k]) if stats[k] else np.zeros(0)
        s = s[np.isfinite(s)]
        lo = hi = math.nan
        if len(s) >= max(10, n_boot // 10):
            lo, hi = (float(v) for v in np.quantile(s, [alpha / 2, 1 - alpha / 2]))
        out[k] = {"value": point[k], "ci_low": lo, "ci_high": hi}
        out["n_boot"] = max(out["n_boot"], int(len(s)))
    return out


def reliability_bins(y_true: Sequence[int], prob: Sequence[float], bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width bin: its edges, record count, mean probability and fraction positive."""
    y, p = _arrays(y_true, prob)
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    out = []
    for k in range(bins):
        m = idx == k
        out.append({"lo": k / bins, "hi": (k + 1) / bins, "n": int(m.sum()),
                    "mean_prob": float(p[m].mean()) if m.any() else math.nan,
                    "frac_pos": float(y[m].mean()) if m.any() else math.nan})
    return out


def at_threshold(y_true: Sequence[int], prob: Sequence[float], threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV and accuracy of the decision ``p >= threshold``."""
    y, p = _arrays(y_true, prob)
    d = p >= threshold
    tp, fp = int((d & (y == 1)).sum()), int((d & (y == 0)).sum())
    fn, tn = int((~d & (y == 1)).sum()), int((~d & (y == 0)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    return {"threshold": float(threshold), "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn), "accuracy": ratio(tp + tn, len(y)),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def choose_threshold(y_true: Sequence[int], prob: Sequence[float], rule: str = "youden",
                     target: float = 0.9) -> dict:
    """The decision threshold of ``rule`` on (validation) predictions; ValueError with one class only.

    The threshold is one of the scores, so ``p >= threshold`` reproduces the reported
    validation sensitivity and specificity exactly.
    """
    ThresholdConfig(rule, target).validate()
    y, p = _arrays(y_true, prob)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(f"only one class among {len(y)} validation predictions: no threshold")
    scores = np.unique(p)[::-1]                                          # candidate thresholds, high to low
    tpr = np.array([(p[y == 1] >= s).mean() for s in scores])
    spec = np.array([(p[y == 0] < s).mean() for s in scores])
    if rule == "youden":
        i = int(np.argmax(tpr + spec - 1.0))                             # first maximum: the highest threshold
    else:
        i = int(np.flatnonzero(tpr >= target - EPS)[0])                  # the last point always has tpr = 1
    return {"threshold": float(scores[i]), "rule": rule, "target": float(target) if rule == "sensitivity" else None,
            "val_sensitivity": float(tpr[i]), "val_specificity": float(spec[i]), "n_val": int(len(y)),
            "n_val_pos": n_pos}


def format_point(v: dict, digits: int = 3) -> str:
    """``0.812 [0.701, 0.903]`` (or "–" when undefined)."""
    if v is None or v.get("value") is None or not np.isfinite(v["value"]):
        return "–"
    ci = "" if v.get("ci_low") is None or not np.isfinite(v["ci_low"]) else \
        f" [{v['ci_low']:.{digits}f}, {v['ci_high']:.{digits}f}]"
    return f"{v['value']:.{digits}f}{ci}"


# ---------------------------------------------------------------------- evaluation tables
OP_CSV_FIELDS = [f"{k}{suffix}" for k in POINTS for suffix in ("", "_ci_low", "_ci_high")] + [
    "val_threshold_sensitivity", "val_threshold_specificity"]


def saved_threshold(layout, system: str, seed: int, task: str) -> dict | None:
    """The decision threshold the unit's saved stage-2 model chose on validation for ``task`` (None: none)."""
    path = Path(layout.finetune_run(system, seed)) / "model"
    return _thresholds(str(path)).get(task)


def _thresholds(model_dir: str) -> dict:
    from respiramfm.errors import CheckpointError
    from respiramfm.models.saved import read_config

    if not (Path(model_dir) / "config.json").is_file():
        return {}
    try:
        return read_config(model_dir).get("thresholds", {})
    except CheckpointError:
        return {}


def with_operating_points(row: dict, y, probs, patients, n_boot: int, thresholds=()) -> dict:
    """Add ``row["operating"]`` (the seeds' mean operating points on the records all seeds scored) and,
    when the seeds' saved models chose a threshold on validation (``thresholds``: one entry or None per
    row of ``probs``), ``row["at_val_threshold"]``: the test sensitivity, specificity, PPV and NPV of those
    thresholds, averaged over the seeds that have one (point estimates)."""
    row["operating"] = operating_points(y, probs, patients, n_boot=n_boot, seed=0)
    rows = np.asarray(probs, dtype=np.float64).reshape(-1, len(y))
    got = [(t, at_threshold(y, r, t["threshold"])) for t, r in zip(thresholds, rows) if t]
    if got:
        row["at_val_threshold"] = {
            "rule": got[0][0].get("rule"), "target": got[0][0].get("target"), "n_seeds": len(got),
            "thresholds": [t["threshold"] for t, _ in got],
            **{k: float(np.nanmean([a[k] for _, a in got])) if any(np.isfinite(a[k]) for _, a in got) else math.nan
               for k in ("sensitivity", "specificity", "ppv", "npv")}}
    return row


def operating_csv(row: dict) -> dict:
    """The flat CSV columns of ``row["operating"]`` (empty when the row has none)."""
    op = row.get("operating") or {}
    out = {}
    for k in POINTS:
        v = op.get(k) or {}
        out.update({k: v.get("value"), f"{k}_ci_low": v.get("ci_low"), f"{k}_ci_high": v.get("ci_high")})
    at = row.get("at_val_threshold") or {}
    out.update(val_threshold_sensitivity=at.get("sensitivity"), val_threshold_specificity=at.get("specificity"))
    return out


def _at_threshold_cell(row: dict) -> str:
    at = row.get("at_val_threshold")
    if not at or at.get("sensitivity") is None or not np.isfinite(at["sensitivity"]):
        return "–"
    spec = at.get("specificity")
    spec = f"{spec:.3f}" if spec is not None and np.isfinite(spec) else "–"
    return f"{at['sensitivity']:.3f} / {spec} ({at.get('rule')})"


def operating_table(summary: dict) -> str:
    """Markdown: one line per (task, system) with every operating point and its CI ("" without rows)."""
    rows = [r for r in summary["rows"] if r.get("operating")]
    if not rows:
        return ""
    sim = "SIMULATED data. " if summary.get("simulated") else ""
    lines = ["", "## Operating points", "",
             f"{sim}Seed-mean value [95% CI, patient-level bootstrap, {summary.get('n_boot')} resamples] on the "
             "records every seed scored. Sens @ X% spec: the highest sensitivity among thresholds with "
             "specificity >= X%; Spec @ 90% sens likewise. Brier: mean squared error of the probability. "
             f"ECE: expected calibration error over {ECE_BINS} equal-width probability bins. Last column: test "
             "sensitivity / specificity at the threshold each seed's saved model chose on validation (seed mean, "
             "no CI; – when the system saves none).", "",
             "| Task | System | n (pos) | " + " | ".join(LABELS[k] for k in POINTS)
             + " | Sens / spec at val. threshold |",
             "|---|---|---|" + "---|" * (len(POINTS) + 1)]
    for r in rows:
        op = r["operating"]
        lines.append(f"| {r['task']} | {r['system']} | {op['n']} ({op['n_pos']}) | "
                     + " | ".join(format_point(op[k]) for k in POINTS) + f" | {_at_threshold_cell(r)} |")
    return "\n".join(lines) + "\n"


__all__ = ["ECE_BINS", "LABELS", "OP_CSV_FIELDS", "POINTS", "RULES", "ThresholdConfig", "at_threshold",
           "choose_threshold", "format_point", "operating_csv", "operating_points", "operating_table",
           "reliability_bins", "with_operating_points"]
