"""Patient-level train/val/test splits.

A patient's recordings are strongly correlated (same lungs, same voice, same
device), so a split that lets one patient reach two sides measures memory, not
diagnosis. Everything here works on patients: :func:`assign_splits` deals whole
patients to splits, and :func:`check_no_leakage` refuses a manifest in which one
patient appears in two splits.

Splits are computed per dataset. With ``keep_existing`` an official split is
respected (ICBHI's, UK COVID-19's): patients that already have one keep it, a
validation split is carved from the official training patients when the dataset
ships only train/test (model selection must never look at test), and patients
without a split are dealt over all three. Within a dataset patients are stratified
by ``stratify_by`` (their most frequent value of that field) and dealt with a
deficit rule that keeps every stratum, and the whole, close to ``fractions``.
Given the same records and seed the result is identical.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import Counter, defaultdict
from typing import Iterable, Sequence

from respiramfm.data.records import Record
from respiramfm.errors import ConfigError, DataError

SPLIT_NAMES = ("train", "val", "test")


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test), got {fractions!r}")
    total = float(sum(fractions))
    return tuple(f / total for f in fractions)  # type: ignore[return-value]


def _patient_key(r: Record) -> tuple[str, str]:
    return (r.dataset, r.patient_id)


def _deal(patients: list[str], strata: dict[str, str], weights: Sequence[float], names: Sequence[str],
          rng: random.Random) -> dict[str, str]:
    """Deal patients to ``names`` in proportion to ``weights``, stratum by stratum.

    Each next patient goes to the split furthest below its target share, with the
    deficit carried across strata, so small strata do not all round the same way.
    """
    total = float(sum(weights))
    weights = [w / total for w in weights]
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for p in patients:
        by_stratum[strata[p]].append(p)
    assigned = [0] * len(names)
    out: dict[str, str] = {}
    for stratum in sorted(by_stratum):
        group = sorted(by_stratum[stratum])
        rng.shuffle(group)
        for p in group:
            n = sum(assigned) + 1
            k = max(range(len(names)), key=lambda i: (weights[i] * n - assigned[i], -i))
            assigned[k] += 1
            out[p] = names[k]
    return out


def assign_splits(records: Iterable[Record], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                  stratify_by: str | None = "diagnosis", keep_existing: bool = True) -> list[Record]:
    """Copies of ``records`` with ``split`` set at patient level (input order kept; input untouched)."""
    records = list(records)
    ftrain, fval, ftest = _check_fractions(fractions)
    if stratify_by is not None and stratify_by not in {f.name for f in dataclasses.fields(Record)}:
        raise ValueError(f"stratify_by must be a Record field or None, got {stratify_by!r}")
    empty = [r.record_id for r in records if not r.patient_id]
    if empty:
        raise DataError(f"record(s) without patient_id cannot be split by patient: {empty[:10]}")
    if keep_existing:
        check_no_leakage(records)

    by_dataset: dict[str, dict[tuple[str, str], list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_dataset[r.dataset][_patient_key(r)].append(r)

    decided: dict[tuple[str, str], str] = {}
    for dataset in sorted(by_dataset):
        patients = by_dataset[dataset]
        rng = random.Random(f"{seed}/{dataset}")
        strata = {}
        for key, recs in patients.items():
            if stratify_by is None:
                strata[key[1]] = ""
            else:
                counts = Counter(str(getattr(r, stratify_by)) for r in recs)
                strata[key[1]] = min(counts, key=lambda v: (-counts[v], v))
        existing = {key[1]: next((r.split for r in recs if r.split), "") for key, recs in patients.items()}
        if not keep_existing:
            existing = {p: "" for p in existing}
        fresh = [p for p, s in existing.items() if not s]
        has = {s for s in existing.values() if s}
        result = {p: s for p, s in existing.items() if s}
        if fresh:
            result.update(_deal(fresh, strata, (ftrain, fval, ftest), SPLIT_NAMES, rng))
        if has and "val" not in has and fval > 0:
            # an official train/test split without validation: carve val out of the official train patients
            official_train = [p for p, s in existing.items() if s == "train"]
            if official_train:
                carved = _deal(official_train, strata, (ftrain, fval), ("train", "val"), rng)
                result.update(carved)
        for p, s in result.items():
            decided[(dataset, p)] = s
    return [dataclasses.replace(r, split=decided[_patient_key(r)]) for r in records]


def check_no_leakage(records: Iterable[Record], path: str | os.PathLike | None = None) -> None:
    """Raise :class:`DataError` naming every patient whose records sit in more than one split.

    ``path``, when given, is the file the records came from; the error names it.
    """
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in records:
        if r.split:
            seen[_patient_key(r)].add(r.split)
    leaks = sorted((k, sorted(v)) for k, v in seen.items() if len(v) > 1)
    if leaks:
        shown = "; ".join(f"{pid} ({ds}) in {'+'.join(s)}" for (ds, pid), s in leaks[:20])
        more = f" and {len(leaks) - 20} more" if len(leaks) > 20 else ""
        raise DataError(f"{len(leaks)} patient(s) appear in more than one split: {shown}{more}", path=path)


def split_summary(records: Iterable[Record]) -> dict[str, dict[str, int]]:
    """{split: {diagnosis: n_records}} for reports."""
    out: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        out[r.split or "unassigned"][r.diagnosis or "unlabelled"] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def patient_label(r: Record) -> str:
    """``dataset/patient_id``: a patient's identity across datasets, as printed in reports.

    The adapters already write ids as ``dataset/...`` (``kauh/P100``); those are kept as they
    are, never prefixed twice (``kauh/kauh/P100``)."""
    pid = str(r.patient_id)
    return pid if pid.startswith(f"{r.dataset}/") else f"{r.dataset}/{pid}"


def split_records(records: Sequence, val_fraction: float, datasets: Sequence[str] = ()) -> tuple[list, list, str]:
    """(train records, val records, "manifest"|"carved") for a training stage; test rows are dropped here.

    Train/val come from the manifest's ``split`` column (``""`` counts as train).
    Without any ``val`` row, whole training patients are dealt to validation with
    :func:`assign_splits` (per dataset, stratified by diagnosis, ``val_fraction``
    of the patients, a fixed seed so every training seed sees the same validation set).
    """
    wanted = set(datasets)
    rows = [r for r in records if not wanted or r.dataset in wanted]
    if wanted and not rows:
        raise DataError(f"the manifest has no records of dataset(s) {sorted(wanted)}")
    check_no_leakage(rows)
    assigned = {patient_label(r) for r in rows if r.split in ("val", "test")}
    leak = sorted({patient_label(r) for r in rows if r.split == ""} & assigned)
    if leak:
        raise DataError(f"unassigned records of patient(s) that also have val/test records, e.g. {leak[:5]}")
    pool = [r for r in rows if r.split in ("train", "")]
    val = [r for r in rows if r.split == "val"]
    if val:
        return pool, val, "manifest"
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    # No validation split: deal whole training patients to train/val with the project's splitter
    # (per dataset, stratified by diagnosis, fixed seed so every training seed sees the same val set).
    as_train = [dataclasses.replace(r, split="train") for r in pool]
    dealt = assign_splits(as_train, fractions=(1.0 - val_fraction, val_fraction, 0.0), seed=0)
    train = [r for r in dealt if r.split == "train"]
    val = [r for r in dealt if r.split == "val"]
    if not val or not train:
        raise DataError(f"cannot carve a validation split from {len({patient_label(r) for r in pool})} training "
                        "patient(s); add val rows to the manifest")
    return train, val, "carved"


def is_simulated(records: Sequence) -> bool:
    """True when any record comes from the simulated cohort (figures and reports must say so)."""
    return any(bool(r.extra.get("simulated")) or r.dataset.lower().startswith("sim") for r in records)
