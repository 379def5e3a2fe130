"""``respiramfm audit MANIFEST --task T``: how well each metadata field ALONE predicts a task's label.

A recording-setup shortcut (one device, one site, one filter mode used mostly for one class)
lets a model score well without hearing the disease. Before trusting a result, look at how
much of the label the metadata already gives away. For each field the audit fits a
one-field logistic regression with patient-grouped cross-validation (out-of-fold scores, so
a field with one value per patient does not score itself), averages the scores per patient
and reports the patient-level AUROC with a patient bootstrap CI.

Fields (``None`` when a manifest does not have them):

===========  =====================================================================
device       ``Record.device`` (ICBHI: AKGC417L / LittC2SE / Litt3200 / Meditron)
filter       ``extra['filter']`` (KAUH stethoscope filter mode: bell / diaphragm / extended)
location     ``Record.location`` (chest position)
site         ``extra['site']`` when an adapter records one
age          ``Record.age`` (numeric)
sex          ``Record.sex``
sample_rate  native sample rate of the audio file, from its header
duration     duration in seconds, from its header
===========  =====================================================================

A field whose AUROC reaches ``threshold`` (0.8 by default) is flagged as a likely shortcut:
a system that reaches a similar AUROC may be reading the recording setup, not the disease.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from respiramfm.data.records import read_manifest, resolve_audio_path
from respiramfm.data.tasks import all_tasks, get_task, load_tasks_yaml
from respiramfm.errors import ConfigError, DataError
from respiramfm.evaluate.metrics import bootstrap_auroc
from respiramfm.utils.io import atomic_write_json

CATEGORICAL = ("device", "filter", "location", "site", "sex")
NUMERIC = ("age", "sample_rate", "duration")
FIELDS = CATEGORICAL[:3] + ("site", "age", "sex", "sample_rate", "duration")
THRESHOLD = 0.8


def _header(rec, manifest_dir: Path) -> tuple[float | None, float | None]:
    path = resolve_audio_path(rec, manifest_dir)
    if path is None or not path.is_file():
        return None, None
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError):  # not a format libsndfile reads (e.g. webm): no header value
        return None, None
    return float(info.samplerate), float(info.duration)


def field_values(rec, manifest_dir: Path, read_headers: bool = True) -> dict:
    """The audited fields of one record (missing values as ``None``)."""
    extra = rec.extra or {}
    rate, dur = _header(rec, manifest_dir) if read_headers else (None, None)
    return {"device": rec.device or None, "filter": extra.get("filter") or None,
            "location": rec.location or None, "site": extra.get("site") or None, "age": rec.age,
            "sex": rec.sex or None, "sample_rate": rate, "duration": dur}


def _design(values: list, numeric: bool) -> np.ndarray | None:
    if numeric:
        x = np.array([math.nan if v is None else float(v) for v in values])
        known = np.isfinite(x)
        if known.sum() == 0 or np.nanstd(x) == 0:
            return None
        z = np.where(known, (x - np.nanmean(x)) / np.nanstd(x), 0.0)
        return np.stack([z, (~known).astype(float)], axis=1)
    cats = sorted({str(v) for v in values}, key=str)
    if len(cats) < 2:
        return None
    index = {c: i for i, c in enumerate(cats)}
    out = np.zeros((len(values), len(cats)))
    out[np.arange(len(values)), [index[str(v)] for v in values]] = 1.0
    return out


def _oof_scores(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    n_splits = min(folds, len(np.unique(groups[y == 1])), len(np.unique(groups[y == 0])))
    if n_splits < 2:
        raise ValueError("fewer than two patients in a class")
    out = np.zeros(len(y))
    for train, test in StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, y, groups):
        if len(np.unique(y[train])) < 2:
            out[test] = y[train].mean()
            continue
        model = LogisticRegression(max_iter=1000).fit(x[train], y[train])
        out[test] = model.predict_proba(x[test])[:, 1]
    return out


def audit_task(records: list, task, manifest_dir: Path, *, folds: int = 5, seed: int = 0, n_boot: int = 1000,
               threshold: float = THRESHOLD, read_headers: bool = True) -> dict:
    """The audit of one task: counts and one row per field (see the module docstring)."""
    rows = [(r, y) for r in records for y in [task.label(r)] if y is not None]
    if not rows:
        raise DataError(f"task {task.name}: no record of the manifest(s) is labelled for it "
                        f"(dataset {task.dataset!r}, positive {list(task.positive)}, negative {list(task.negative)})")
    recs = [r for r, _ in rows]
    y = np.array([lab for _, lab in rows], dtype=np.int64)
    groups = np.array([r.patient_id for r in recs])
    values = [field_values(r, manifest_dir, read_headers) for r in recs]
    out = {"task": task.name, "records": len(recs), "patients": int(len(np.unique(groups))),
           "positive_patients": int(len(np.unique(groups[y == 1]))), "threshold": threshold, "fields": []}
    for name in FIELDS:
        col = [v[name] for v in values]
        row: dict = {"field": name, "known": int(sum(v is not None for v in col))}
        if row["known"] == 0:
            row.update(auroc=None, note="absent")
            out["fields"].append(row)
            continue
        x = _design(col, name in NUMERIC)
        if x is None:
            row.update(auroc=0.5, note="one value for every record", flagged=False)
            out["fields"].append(row)
            continue
        try:
            scores = _oof_scores(x, y, groups, folds, seed)
        except ValueError as exc:
            row.update(auroc=None, note=str(exc))
            out["fields"].append(row)
            continue
        per_patient: dict[str, list] = defaultdict(list)
        for g, s, lab in zip(groups, scores, y):
            per_patient[g].append((s, lab))
        pids = sorted(per_patient)
        p_score = [float(np.mean([s for s, _ in per_patient[p]])) for p in pids]
        p_label = [int(max(lab for _, lab in per_patient[p])) for p in pids]
        res = bootstrap_auroc(p_label, p_score, pids, n_boot=n_boot, seed=seed)
        row.update(auroc=None if math.isnan(res.auroc) else round(res.auroc, 4),
                   ci=[None if math.isnan(v) else round(v, 4) for v in (res.ci_low, res.ci_high)],
                   flagged=bool(not math.isnan(res.auroc) and res.auroc >= threshold))
        if name in CATEGORICAL:
            by_value: dict[str, list[int]] = defaultdict(list)
            for v, lab in zip(col, y):
                by_value[str(v)].append(int(lab))
            row["values"] = {k: {"records": len(v), "positive_share": round(float(np.mean(v)), 3)}
                             for k, v in sorted(by_value.items())}
        out["fields"].append(row)
    out["warnings"] = [f"{task.name}: {f['field']} alone predicts the label with patient-level AUROC "
                       f"{f['auroc']:.3f} (>= {threshold}); a model may be reading the recording setup"
                       for f in out["fields"] if f.get("flagged")]
    return out


def format_audit(result: dict) -> str:
    lines = [f"{result['task']}: {result['records']} records, {result['patients']} patients "
             f"({result['positive_patients']} positive)", f"{'field':<12} {'known':>6}  AUROC [95% CI]"]
    for f in result["fields"]:
        if f.get("auroc") is None:
            lines.append(f"{f['field']:<12} {f['known']:>6}  -  ({f.get('note', '')})")
            continue
        ci = f.get("ci") or [None, None]
        ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if None not in ci else ""
        flag = "  <-- shortcut?" if f.get("flagged") else ""
        note = f"  ({f['note']})" if f.get("note") else ""
        lines.append(f"{f['field']:<12} {f['known']:>6}  {f['auroc']:.3f}{ci_text}{note}{flag}")
    return "\n".join(lines + [f"WARNING: {w}" for w in result["warnings"]])


def audit_eval(data, threshold: float = THRESHOLD, n_boot: int = 200, log=print) -> dict:
    """The audit of every task of an evaluation (``EvalData``), all splits, as ``evaluate`` runs it.

    Returns ``{"threshold", "audits", "warnings"}``; a task without labelled records (or
    fewer than two patients in a class) is listed with its reason instead of failing the run.
    """
    origin: dict[str, Path] = {}
    for m in data.manifests:
        for r in read_manifest(m):
            origin[r.record_id] = Path(m).parent
    recs = [dataclasses.replace(r, audio_path=str(resolve_audio_path(r, origin.get(r.record_id, Path("."))) or ""))
            if r.audio_path else r for r in data.records]
    audits, warnings = [], []
    for name, task in data.tasks.items():
        try:
            res = audit_task(recs, task, Path("."), n_boot=n_boot, threshold=threshold)
        except DataError as exc:
            audits.append({"task": name, "error": exc.cause})
            continue
        audits.append(res)
        warnings += res["warnings"]
    for w in warnings:
        log(f"[evaluate] WARNING: {w}")
    return {"threshold": threshold, "audits": audits, "warnings": warnings}


def shortcut_section(summary: dict) -> str:
    """The results.md section of the audit's warnings ("" when the run has no audit or no warning)."""
    found = (summary.get("shortcuts") or {}).get("warnings") or []
    if not found:
        return ""
    return ("\n## Shortcut warnings (metadata alone predicts the label)\n\n"
            + "".join(f"- {w}\n" for w in found)
            + "\nSee `respiramfm audit` (docs/own-data.md): a system near these AUROCs may not be hearing the "
              "disease.\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifests", nargs="+", type=Path, help="manifest CSV(s) written by `respiramfm prepare`")
    parser.add_argument("--task", action="append", default=[], help="task name (repeatable; default: every task "
                                                                       "with labelled records in the manifests)")
    parser.add_argument("--task-file", type=Path, default=None, help="YAML file of extra tasks")
    parser.add_argument("--split", action="append", default=[], help="audit only these splits (default: all)")
    parser.add_argument("--folds", type=int, default=5, help="patient-grouped folds (default 5)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="flag fields at or above this AUROC")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the audit as JSON here")


def run(args: argparse.Namespace) -> int:
    if args.task_file is not None:
        load_tasks_yaml(args.task_file, overwrite=True)
    by_dir = []
    for m in args.manifests:
        recs = read_manifest(m)
        if args.split:
            recs = [r for r in recs if r.split in args.split]
        for r in recs:  # absolute audio paths, so records of several manifests mix freely
            if r.audio_path:
                r.audio_path = str(resolve_audio_path(r, m.parent))
        by_dir.append((m.parent, recs))
    names = args.task or [t.name for t in all_tasks().values()
                          if any(t.label(r) is not None for _, recs in by_dir for r in recs)]
    if not names:
        raise ConfigError("no task has labelled records in the manifest(s); name one with --task")
    results = []
    for name in names:
        task = get_task(name)
        recs = [r for _, rs in by_dir for r in rs]
        res = audit_task(recs, task, Path("."), folds=args.folds, seed=args.seed, threshold=args.threshold)
        results.append(res)
        print(format_audit(res) + "\n")
    if args.out is not None:
        atomic_write_json(args.out, {"audits": results})
    return 0
