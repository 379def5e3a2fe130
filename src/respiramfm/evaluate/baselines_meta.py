"""``meta_only``: a shortcut detector, not a model of disease: device, location, age and sex -> logistic regression.

It sees no audio and no free text, only the recording setup and the demographics that the
records carry. When it scores close to the audio models, the audio models may be reading the
setup too (ICBHI's COPD patients were mostly recorded on other devices, and are much older,
than its healthy ones). Like ``bts_frozen`` it is pooled over the supervised tasks (one
classifier, trained on the train split, ``C`` chosen on the validation split by mean AUROC)
and scores every task's test records with that classifier, zero-shot ones included; a device
or location never seen in training gets an all-zero indicator.

Features: one indicator per device and per location seen in training, ``sex`` (male, female,
unknown), age standardised on training (a missing age gets the training mean and a flag).
Options: ``c_grid`` (default 0.01, 0.1, 1, 10).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from respiramfm.errors import DataError
from respiramfm.evaluate.metrics import auroc
from respiramfm.utils.io import atomic_write_json

LABEL = "metadata only (device, location, age, sex -> logistic regression): a shortcut detector"
SEXES = ("male", "female")


class MetaFeatures:
    """The feature map fitted on training records (vocabularies, age mean and scale)."""

    def __init__(self, records: list):
        self.devices = sorted({r.device for r in records if r.device})
        self.locations = sorted({r.location for r in records if r.location})
        ages = [float(r.age) for r in records if _age(r) is not None]
        self.age_mean = float(np.mean(ages)) if ages else 0.0
        self.age_std = float(np.std(ages)) if len(ages) > 1 and np.std(ages) > 0 else 1.0

    @property
    def names(self) -> list[str]:
        return ([f"device={d}" for d in self.devices] + [f"location={loc}" for loc in self.locations]
                + [f"sex={s}" for s in SEXES] + ["age", "age_missing"])

    def __call__(self, records: list) -> np.ndarray:
        x = np.zeros((len(records), len(self.names)), dtype=np.float64)
        nd, nl = len(self.devices), len(self.locations)
        for i, r in enumerate(records):
            if r.device in self.devices:
                x[i, self.devices.index(r.device)] = 1.0
            if r.location in self.locations:
                x[i, nd + self.locations.index(r.location)] = 1.0
            if r.sex in SEXES:
                x[i, nd + nl + SEXES.index(r.sex)] = 1.0
            age = _age(r)
            x[i, -2] = 0.0 if age is None else (age - self.age_mean) / self.age_std
            x[i, -1] = float(age is None)
        return x

    def to_dict(self) -> dict:
        return {"devices": self.devices, "locations": self.locations, "age_mean": self.age_mean,
                "age_std": self.age_std}


def _age(r) -> float | None:
    try:
        v = float(r.age)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _pooled(data, split: str) -> tuple[list, np.ndarray]:
    pairs = [(r, y) for task in data.supervised for r, y in data.examples(task, split)]
    return [r for r, _ in pairs], np.asarray([y for _, y in pairs], dtype=np.int64)


def meta_only(data, seed: int, work_dir: Path, options: dict) -> dict:
    """Fit on the pooled supervised train split, choose ``C`` on validation, score every task's test records."""
    from sklearn.linear_model import LogisticRegression

    train, y_train = _pooled(data, "train")
    val, y_val = _pooled(data, "val")
    if len(set(y_train.tolist())) < 2:
        raise DataError(f"meta_only: the training split of {data.supervised} holds one class only")
    features = MetaFeatures(train)
    x_train, x_val = features(train), features(val)
    best, scores = None, {}
    for c in [float(v) for v in options.get("c_grid", (0.01, 0.1, 1.0, 10.0))]:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=int(seed)).fit(x_train, y_train)
        score = auroc(y_val, clf.predict_proba(x_val)[:, 1])[0] if len(val) else math.nan
        scores[c] = score
        if best is None or (math.isfinite(score) and not score <= best[0]):
            best = (score if math.isfinite(score) else -math.inf, c, clf)
    _, c, clf = best
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(work_dir) / "training.json", {
        "system": "meta_only", "C": c, "val_auroc": {str(k): v for k, v in scores.items()},
        "features": features.to_dict(), "n_train": len(train), "n_val": len(val),
        "coef": dict(zip(features.names, (float(v) for v in clf.coef_[0]))), "note": LABEL})
    test = data.split("test")
    out = {}
    for name, task in data.tasks.items():
        pairs = task.select(test)
        if pairs:
            probs = clf.predict_proba(features([r for r, _ in pairs]))[:, 1]
            out[name] = {r.record_id: float(p) for (r, _), p in zip(pairs, probs)}
    return out


def describe(work_dir: Path) -> dict:
    """The saved ``training.json`` of a unit (for reports)."""
    return json.loads((Path(work_dir) / "training.json").read_text())


__all__ = ["LABEL", "MetaFeatures", "describe", "meta_only"]
