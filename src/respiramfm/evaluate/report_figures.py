"""Report figures (matplotlib, Agg backend, PNG): ROC curves, attention, data efficiency.

Every figure drawn from simulated data carries "SIMULATED" in its title, so a figure
copied out of the report cannot be mistaken for evidence about patients.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from respiramfm.utils.io import atomic_path

SIM_TAG = "SIMULATED — "


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    _plt().close(fig)
    return path


def roc_figure(task: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
               simulated: bool, subtitle: str = "") -> Path:
    """One task: a ROC curve per system; ``curves[system] = (labels, probs)``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    for system, (y, p) in curves.items():
        if len(set(y.tolist())) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{system} (AUROC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{SIM_TAG if simulated else ''}{task}{(' ' + subtitle) if subtitle else ''}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, Path(path))


def attention_figure(examples: list[dict], path: str | os.PathLike, simulated: bool, top: int = 12) -> Path:
    """Horizontal bars: the context tokens the pooled token attends to most, one panel per example."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(examples), figsize=(3.6 * len(examples), 3.6), squeeze=False)
    for ax, ex in zip(axes[0], examples):
        att = ex["attribution"]
        w = np.asarray(att["weights"], dtype=float)
        order = np.argsort(-w)[:top][::-1]
        ax.barh(range(len(order)), w[order], color="tab:blue")
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels([repr(att["tokens"][i].strip() or att["tokens"][i]) for i in order], fontsize=7)
        ax.set_title(f"{ex['task']} label {ex['label']} p={ex['prob']:.2f}\ncontext mass "
                     f"{att['context_mass']:.2f}", fontsize=8)
        ax.set_xlabel("attention (last layer, heads averaged)", fontsize=7)
    fig.suptitle(f"{SIM_TAG if simulated else ''}attention of the pooled token over context tokens", fontsize=9)
    return _save(fig, Path(path))


def efficiency_figure(eff: dict, path: str | os.PathLike) -> Path:
    """Metric against training fraction, one line per system (mean ± std band)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for system, v in eff["systems"].items():
        x = np.asarray(v.get("fractions") or eff["fractions"], dtype=float)
        m = np.asarray([np.nan if a is None else a for a in v["mean"]], dtype=float)
        s = np.asarray([0.0 if a is None else a for a in (v.get("std") or [0.0] * len(m))], dtype=float)
        ax.plot(x, m, marker="o", label=system)
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of training data")
    ax.set_ylabel(eff.get("metric", "mean AUROC"))
    ax.set_title(f"{SIM_TAG if eff.get('simulated') else ''}data efficiency", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def reliability_figure(task: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
                       simulated: bool, bins: int = 10, subtitle: str = "") -> Path:
    """Reliability diagram of one task: fraction positive against mean probability per equal-width bin."""
    from respiramfm.evaluate.operating import reliability_bins

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    for system, (y, p) in curves.items():
        pts = [b for b in reliability_bins(y, p, bins) if b["n"]]
        if pts:
            ax.plot([b["mean_prob"] for b in pts], [b["frac_pos"] for b in pts], marker="o", label=system)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"mean predicted probability ({bins} equal-width bins)")
    ax.set_ylabel("fraction positive")
    ax.set_title(f"{SIM_TAG if simulated else ''}{task} reliability{(' ' + subtitle) if subtitle else ''}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, Path(path))


__all__ = ["attention_figure", "efficiency_figure", "reliability_figure", "roc_figure"]
