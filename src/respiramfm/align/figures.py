"""t-SNE of audio embeddings before vs after stage-1 alignment, coloured by diagnosis.

The paper's claim is qualitative ("t-SNE clusters are cleaner after alignment"), so the
figure is paired with a number: the cosine silhouette score of the diagnosis labels in
each space (higher = tighter, better separated groups). Figures from the simulated
cohort are labelled "SIMULATED" in the title so they are never mistaken for patient data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from respiramfm.utils.io import atomic_path


def label_silhouette(x: np.ndarray, labels: Sequence[str]) -> float | None:
    """Cosine silhouette of ``labels`` in space ``x`` (None when it is undefined)."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    n_labels = len(set(labels.tolist()))
    if n_labels < 2 or n_labels >= len(labels):
        return None
    return float(silhouette_score(x, labels, metric="cosine"))


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def tsne_2d(x: np.ndarray, seed: int = 0, threads: int | None = None) -> np.ndarray:
    """2-D t-SNE (cosine metric, PCA init). ``threads`` caps OpenMP/BLAS threads: on a busy
    machine, competing OpenMP workers make t-SNE tens of times slower than one thread."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = x.shape[0]
    perplexity = float(max(2.0, min(30.0, (n - 1) / 3.0)))
    with threadpool_limits(limits=threads):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                    metric="cosine").fit_transform(np.asarray(x, dtype=np.float64))


def tsne_before_after(before: np.ndarray, after: np.ndarray, labels: Sequence[str], path: str | os.PathLike,
                      simulated: bool, seed: int = 0, max_points: int = 1500, title: str = "",
                      threads: int | None = None) -> dict:
    """Save a two-panel PNG and return the silhouette scores of both spaces.

    ``before``: frozen audio embeddings (N, 768); ``after``: the projector's outputs for the
    same rows (N, d); ``labels``: diagnosis per row.
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    before, after = np.asarray(before), np.asarray(after)
    if before.shape[0] != after.shape[0] or len(labels) != before.shape[0]:
        raise ValueError("before, after and labels must have the same number of rows")
    if before.shape[0] < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {before.shape[0]}")
    idx = _subsample(before.shape[0], max_points, seed)
    lab = np.asarray([s or "(unknown)" for s in labels])[idx]
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        scores = {"silhouette_before": label_silhouette(before[idx], lab),
                  "silhouette_after": label_silhouette(after[idx], lab), "n_points": int(len(idx))}
    classes = sorted(set(lab.tolist()))
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    fig = Figure(figsize=(11, 5))
    axes = fig.subplots(1, 2)
    for ax, x, name, key in ((axes[0], before[idx], "before alignment (audio encoder)", "silhouette_before"),
                             (axes[1], after[idx], "after alignment (projector)", "silhouette_after")):
        xy = tsne_2d(x, seed, threads)
        for j, c in enumerate(classes):
            m = lab == c
            ax.scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.75, color=cmap(j % cmap.N), label=f"{c} ({int(m.sum())})")
        s = scores[key]
        ax.set_title(f"{name}\nsilhouette (cosine) = {s:.3f}" if s is not None else name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="diagnosis")
    head = title or "t-SNE of audio embeddings, coloured by diagnosis"
    if simulated:
        head = f"SIMULATED DATA — {head}"
    fig.suptitle(head, fontsize=11, color="darkred" if simulated else "black")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return scores
