"""Patient-grouped, diagnosis-stratified k-fold cross-validation over one supervised dataset.

Every patient of the supervised dataset lands in exactly one fold's test split; the other
folds' patients are that fold's training pool, from which a validation split is carved by
whole patients (stratified by diagnosis, :func:`respiramfm.data.splits.assign_splits`). A
zero-shot dataset (KAUH) is test data in every fold: it is never trained or validated on.

    folds = assign_folds(icbhi_records, k=5, seed=0)        # {patient: fold}
    recs = fold_records(icbhi_records, kauh_records, folds, 0, val_fraction=0.15, seed=0)
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from respiramfm.data.records import Record
from respiramfm.data.splits import assign_splits, check_no_leakage, patient_label
from respiramfm.errors import ConfigError, DataError


@dataclass
class CrossValidation:
    """Patient-grouped k-fold CV of the ``real-lung`` preset (``PipelineConfig.cv``)."""

    folds: int = 5                   # folds over the supervised dataset's patients
    only_folds: list[int] = field(default_factory=list)   # [] = every fold (a subset runs a part of the run)
    val_fraction: float = 0.15       # of each fold's training patients, carved by patient
    probe: bool = True               # encoder probe (frozen embeddings -> logistic regression) on validation
    probe_only: bool = False         # stop each fold after its encoder and probe (compare encoders cheaply)
    # restrict: the same scores on one recording setup per dataset ({dataset: {field or extra key: value}})
    restrict: dict = field(default_factory=lambda: {"icbhi": {"device": "Meditron"}, "kauh": {"filter": "extended"}})

    def validate(self) -> "CrossValidation":
        if self.folds < 2:
            raise ConfigError(f"cv.folds must be >= 2, got {self.folds}")
        bad = [k for k in self.only_folds if not 0 <= int(k) < self.folds]
        if bad:
            raise ConfigError(f"cv.only_folds {bad} outside 0..{self.folds - 1}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"cv.val_fraction must lie in (0, 1), got {self.val_fraction!r}")
        return self


def assign_folds(records: Sequence[Record], k: int, seed: int = 0) -> dict[str, int]:
    """{patient label: fold in 0..k-1}: patients dealt round-robin per diagnosis after a seeded shuffle.

    The deal continues across diagnoses (the next diagnosis starts at the fold after the last one
    used), so fold sizes differ by at most one patient and every fold gets its share of each class.
    """
    if k < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, got {k}")
    by_diag: dict[str, set[str]] = defaultdict(set)
    for r in records:
        by_diag[r.diagnosis].add(patient_label(r))
    patients = {p for ps in by_diag.values() for p in ps}
    if len(patients) < k:
        raise DataError(f"{len(patients)} patient(s) cannot fill {k} folds")
    clash = [p for p in patients if sum(p in ps for ps in by_diag.values()) > 1]
    if clash:
        raise DataError(f"patient(s) with more than one diagnosis cannot be stratified: {sorted(clash)[:5]}")
    rng = random.Random(f"folds/{seed}")
    folds, nxt = {}, 0
    # small classes first, so each of their few patients reaches a different fold
    for diag in sorted(by_diag, key=lambda d: (len(by_diag[d]), d)):
        group = sorted(by_diag[diag])
        rng.shuffle(group)
        for p in group:
            folds[p] = nxt % k
            nxt += 1
    return folds


def fold_records(supervised: Sequence[Record], zero_shot: Sequence[Record], folds: dict[str, int], fold: int,
                 val_fraction: float = 0.15, seed: int = 0) -> list[Record]:
    """The manifest of one fold: its patients to test, the rest to train/val, ``zero_shot`` all to test."""
    k = max(folds.values()) + 1
    if not 0 <= fold < k:
        raise ConfigError(f"fold must lie in 0..{k - 1}, got {fold}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    missing = sorted({patient_label(r) for r in supervised} - set(folds))
    if missing:
        raise DataError(f"{len(missing)} patient(s) have no fold, e.g. {missing[:5]}")
    test = [dataclasses.replace(r, split="test") for r in supervised if folds[patient_label(r)] == fold]
    pool = [dataclasses.replace(r, split="train") for r in supervised if folds[patient_label(r)] != fold]
    dealt = assign_splits(pool, fractions=(1.0 - val_fraction, val_fraction, 0.0), seed=seed * 1000 + fold,
                          keep_existing=False)
    if not any(r.split == "val" for r in dealt):
        raise DataError(f"fold {fold}: no validation patient could be carved from {len(pool)} training records")
    shared = {patient_label(r) for r in zero_shot} & {patient_label(r) for r in supervised}
    if shared:
        raise DataError(f"patient(s) in both the supervised and the zero-shot data: {sorted(shared)[:5]}")
    out = dealt + test + [dataclasses.replace(r, split="test") for r in zero_shot]
    check_no_leakage(out)
    return out


def fold_counts(records: Sequence[Record]) -> dict:
    """{split: {"records": n, "patients": n}} per dataset, for the run summary."""
    out: dict = {}
    for r in records:
        d = out.setdefault(r.dataset, {}).setdefault(r.split, {"records": 0, "patients": set()})
        d["records"] += 1
        d["patients"].add(patient_label(r))
    return {ds: {s: {"records": v["records"], "patients": len(v["patients"])} for s, v in splits.items()}
            for ds, splits in out.items()}


__all__ = ["CrossValidation", "assign_folds", "fold_counts", "fold_records"]
