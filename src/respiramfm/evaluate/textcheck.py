"""Text-only check on REAL metadata: how much COVID signal the templated symptom text carries.

The paper's Coswara ablation reports text alone far above audio alone (accuracy 0.79 vs
0.61). This check measures the text branch on the real Coswara (T5 labels) and Coughvid
(T2 labels) metadata in ``../shared/data`` — no audio is needed — with two predictors:

(a) **LLM text path**: the frozen SmolLM2-135M embedding of the templated context
    (``text_targets(..., "hidden_mean")``, the same vectors stage 1 aligns to), then a
    standardised logistic regression. (The fine-tuned fusion model in ``text_only`` mode
    is the heavier alternative; it is not used here, to keep the check minutes on a CPU.)
(b) **raw flags**: logistic regression on binary indicators of the canonical symptom and
    medical-history phrases (plus "explicitly none" / "not reported" indicators).

Both use one patient-level train/test split (``GroupShuffleSplit``); the regularisation
C is chosen by stratified grouped 5-fold cross-validation on the training patients only. Test AUROC
comes with a patient-level bootstrap 95% CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from respiramfm.errors import DataError
from respiramfm.evaluate.metrics import bootstrap_auroc
from respiramfm.models.processing import record_context
from respiramfm.utils.io import atomic_write_json

DATASETS = {"coswara": ("coswara", "T5"), "coughvid": ("coughvid", "T2")}
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


def load_labelled(data_root: str | os.PathLike, dataset: str, max_records: int | None = None,
                  seed: int = 0) -> tuple[list, np.ndarray]:
    """(records, labels) of the dataset's task; an optional seeded subsample of ``max_records``."""
    from respiramfm.data.datasets import get_adapter
    from respiramfm.data.tasks import get_task

    if dataset not in DATASETS:
        raise DataError(f"textcheck knows {sorted(DATASETS)}, not {dataset!r}")
    folder, task_name = DATASETS[dataset]
    root = Path(data_root) / folder
    if not root.is_dir():
        raise DataError(f"no {dataset} folder", path=str(root))
    records = get_adapter(dataset)(root).records
    pairs = get_task(task_name).select(records)
    if not pairs:
        raise DataError(f"no labelled {task_name} records in {dataset}", path=str(root))
    if max_records and len(pairs) > max_records:
        idx = np.sort(np.random.default_rng(seed).choice(len(pairs), max_records, replace=False))
        pairs = [pairs[i] for i in idx]
    return [r for r, _ in pairs], np.array([y for _, y in pairs], dtype=np.int64)


def _phrases(value: str, field: str) -> list[str]:
    v = (value or "").strip()
    if not v:
        return [f"{field}:not reported"]
    if v == "none":
        return [f"{field}:none"]
    return [f"{field}:{p.strip()}" for p in v.split(";") if p.strip()]


def symptom_flags(records: list, vocab: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Binary matrix of symptom / history phrases; ``vocab`` from the training records."""
    rows = [set(_phrases(r.symptoms, "symptom") + _phrases(r.medical_history, "history")) for r in records]
    if vocab is None:
        vocab = sorted(set().union(*rows))
    col = {v: i for i, v in enumerate(vocab)}
    x = np.zeros((len(records), len(vocab)), dtype=np.float32)
    for i, row in enumerate(rows):
        for p in row:
            if p in col:
                x[i, col[p]] = 1.0
    return x, vocab


def _fit_predict(x_tr, y_tr, g_tr, x_te, seed: int, scale: bool) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = ([StandardScaler()] if scale else []) + [LogisticRegression(max_iter=5000, random_state=seed)]
    pipe = make_pipeline(*steps)
    folds = list(StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed).split(x_tr, y_tr, g_tr))
    search = GridSearchCV(pipe, {"logisticregression__C": list(C_GRID)}, cv=folds, scoring="roc_auc")
    search.fit(x_tr, y_tr)
    return search.predict_proba(x_te)[:, 1], float(search.best_params_["logisticregression__C"])


def _embed_texts(texts: list[str], backbone) -> np.ndarray:
    """Frozen-LLM mean hidden state per text (each distinct text embedded once)."""
    from respiramfm.llm.text_embed import text_targets

    uniq = sorted(set(texts))
    vecs = text_targets(backbone, uniq, space="hidden_mean").numpy()
    at = {t: i for i, t in enumerate(uniq)}
    return vecs[[at[t] for t in texts]]


def check_dataset(data_root, dataset: str, backbone, max_records: int | None = None, seed: int = 0,
                  test_fraction: float = 0.3, n_boot: int = 1000) -> dict:
    from sklearn.model_selection import GroupShuffleSplit

    records, y = load_labelled(data_root, dataset, max_records, seed)
    groups = np.array([f"{r.dataset}/{r.patient_id}" for r in records])
    tr, te = next(GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed).split(y, y, groups))
    if set(groups[tr]) & set(groups[te]):
        raise DataError(f"{dataset}: a patient is in both the train and test part")  # cannot happen; checked anyway
    out = {"dataset": dataset, "task": DATASETS[dataset][1], "n_train": int(len(tr)), "n_test": int(len(te)),
           "n_pos_train": int(y[tr].sum()), "n_pos_test": int(y[te].sum()), "seed": seed,
           "split": "patient-level GroupShuffleSplit", "selection": "C by stratified grouped 5-fold CV on train"}
    flags_tr, vocab = symptom_flags([records[i] for i in tr])
    flags_te, _ = symptom_flags([records[i] for i in te], vocab)
    p_flags, c_flags = _fit_predict(flags_tr, y[tr], groups[tr], flags_te, seed, scale=False)
    texts = [record_context(r) for r in records]
    emb = _embed_texts(texts, backbone)
    p_llm, c_llm = _fit_predict(emb[tr], y[tr], groups[tr], emb[te], seed, scale=True)
    for key, p, c, extra in (("llm_text_lr", p_llm, c_llm, {"features": f"frozen {backbone.name_or_path} hidden_mean of "
                                                                         f"the templated context", "dim": emb.shape[1],
                                                                         "distinct_texts": len(set(texts))}),
                             ("symptom_flags_lr", p_flags, c_flags, {"features": "binary symptom/history phrases",
                                                                     "dim": len(vocab)})):
        b = bootstrap_auroc(y[te], p, groups[te], n_boot=n_boot, seed=seed)
        out[key] = {"auroc": b.auroc, "ci_low": b.ci_low, "ci_high": b.ci_high, "C": c, **extra,
                    **({"reason": b.reason} if b.reason else {})}
    return out


def run_textcheck(data_root: str | os.PathLike, out: str | os.PathLike | None = None,
                  datasets: tuple[str, ...] = ("coswara", "coughvid"), max_records: int | None = None, seed: int = 0,
                  backbone: str = "smollm2-135m", n_boot: int = 1000, backbone_obj=None) -> dict:
    """Run the check on each dataset; writes ``out`` (JSON) when given. Real data only."""
    from respiramfm.llm.backbones import load_backbone

    bb = backbone_obj if backbone_obj is not None else load_backbone(backbone)
    result = {"simulated": False, "data_root": str(data_root), "max_records": max_records,
              "datasets": {d: check_dataset(data_root, d, bb, max_records, seed, n_boot=n_boot) for d in datasets}}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)
    return result


__all__ = ["check_dataset", "load_labelled", "run_textcheck", "symptom_flags"]
