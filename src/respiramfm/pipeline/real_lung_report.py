"""The ``real-lung`` aggregate over folds: ``OUT/results.{json,md}``.

* ICBHI tasks (T4, T4R): every ICBHI patient is a test patient of exactly one fold, so the
  out-of-fold predictions are pooled and scored once.
* KAUH tasks (T7, T8): every fold model scores all of KAUH; we report the mean (± std) of the
  per-fold AUROCs and the AUROC of the fold ensemble (mean probability over fold models).
* Levels: ``cycle`` (one record = one respiratory cycle for ICBHI, one 10-s recording for KAUH),
  ``recording`` (mean probability over a recording's cycles) and ``patient`` (mean over all of a
  patient's records). CIs resample patients (:func:`respiramfm.evaluate.metrics.bootstrap_auroc`).
* Paired differences to RespiraMFM (:mod:`respiramfm.evaluate.paired`) and the operating points
  (:mod:`respiramfm.evaluate.operating`) at the cycle level, patients resampled.
* ``restricted``: the same scores on one recording setup only (``cfg.cv.restrict``: ICBHI's Meditron
  recordings, KAUH's extended-filter recordings), to see how much rides on the setup.

Seeds, when there are several, are averaged per record before scoring.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from respiramfm.data.records import read_manifest
from respiramfm.data.splits import patient_label
from respiramfm.evaluate.layout import RunLayout
from respiramfm.evaluate.metrics import auroc, bootstrap_auroc, mean_std
from respiramfm.evaluate.predictions import read_predictions
from respiramfm.utils.io import atomic_write_json, atomic_write_text

LEVELS = ("cycle", "recording", "patient")
REFERENCE = "respiramfm"


def _key(rec, level: str) -> str:
    if level == "patient":
        return patient_label(rec)
    if level == "recording":
        return f"{rec.dataset}/{rec.extra.get('recording')}" if rec.extra.get("recording") else rec.record_id
    return rec.record_id


def collapse(probs: dict[str, float], labels: dict[str, int], records: dict, level: str):
    """(keys, y, p, patients) at ``level``: mean probability per key."""
    groups: dict[str, list[str]] = defaultdict(list)
    for rid in probs:
        groups[_key(records[rid], level)].append(rid)
    keys = sorted(groups)
    y = [labels[groups[k][0]] for k in keys]
    p = [float(np.mean([probs[r] for r in groups[k]])) for k in keys]
    patients = [patient_label(records[groups[k][0]]) for k in keys]
    return keys, y, p, patients


def _score(probs, labels, records, level, n_boot) -> dict:
    if not probs:
        return {"auroc": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0, "n_pos": 0, "n_patients": 0,
                "reason": "no predictions"}
    _, y, p, pats = collapse(probs, labels, records, level)
    return bootstrap_auroc(y, p, pats, n_boot=n_boot, seed=0).to_dict()


def fold_predictions(paths, folds: int, system: str, seeds: list[int]) -> dict:
    """{fold: {task: ({record_id: prob averaged over seeds}, {record_id: label})}}."""
    out = {}
    for k in range(folds):
        layout = RunLayout(paths.root / "folds" / f"fold{k}" / "evaluate")
        probs: dict = defaultdict(lambda: defaultdict(list))
        labels: dict = defaultdict(dict)
        for s in seeds:
            path = layout.predictions(system, s)
            if not path.is_file():
                continue
            for r in read_predictions(path):
                probs[r["task"]][r["record_id"]].append(r["prob"])
                labels[r["task"]][r["record_id"]] = r["label"]
        out[k] = {t: ({rid: float(np.mean(v)) for rid, v in ps.items()}, dict(labels[t])) for t, ps in probs.items()}
    return out


def pooled(per_fold: dict, task: str, zero_shot: bool) -> tuple[dict, dict]:
    """ICBHI: the out-of-fold predictions together; KAUH: the fold ensemble (mean over fold models)."""
    probs: dict = defaultdict(list)
    labels: dict = {}
    for preds in per_fold.values():
        if task in preds:
            for rid, p in preds[task][0].items():
                probs[rid].append(p)
            labels.update(preds[task][1])
    if not zero_shot and any(len(v) > 1 for v in probs.values()):
        raise ValueError(f"{task}: a record was a test record of more than one fold")
    return {rid: float(np.mean(v)) for rid, v in probs.items()}, labels


def _matches(rec, rule: dict) -> bool:
    return all((getattr(rec, k, None) if k in ("device", "location") else rec.extra.get(k)) == v
               for k, v in rule.items())


def _restrict(probs: dict, records: dict, rule: dict) -> dict:
    return {rid: p for rid, p in probs.items() if _matches(records[rid], rule)}


def system_rows(cfg, paths, system: str, records: dict, tasks: dict) -> list[dict]:
    per_fold = fold_predictions(paths, cfg.cv.folds, system, list(cfg.evaluate.seeds))
    rows = []
    for name, task in tasks.items():
        zero_shot = task.role == "zero-shot"
        probs, labels = pooled(per_fold, name, zero_shot)
        row = {"task": name, "system": system, "dataset": task.dataset, "role": task.role,
               "scored_as": "fold ensemble (mean probability)" if zero_shot else "pooled out-of-fold",
               "levels": {lv: _score(probs, labels, records, lv, cfg.evaluate.n_boot) for lv in LEVELS}}
        if zero_shot:
            for lv in LEVELS:
                vals = [_score(p[name][0], p[name][1], records, lv, 0)["auroc"] for p in per_fold.values()
                        if name in p]
                m, s, n = mean_std(vals)
                row["levels"][lv]["fold_mean"], row["levels"][lv]["fold_std"], row["levels"][lv]["n_folds"] = m, s, n
        rule = (cfg.cv.restrict or {}).get(task.dataset)
        if rule:
            sub = _restrict(probs, records, rule)
            row["restricted"] = {"rule": rule, **{lv: _score(sub, labels, records, lv, cfg.evaluate.n_boot)
                                                  for lv in ("cycle", "patient")}}
        row["operating"] = _operating(probs, labels, records, cfg.evaluate.n_boot)
        row["_probs"], row["_labels"] = probs, labels
        rows.append(row)
    return rows


def _operating(probs, labels, records, n_boot) -> dict | None:
    try:
        from respiramfm.evaluate.operating import operating_points
    except ImportError:  # pragma: no cover - the protocol's operating points not installed
        return None
    if not probs:
        return None
    _, y, p, pats = collapse(probs, labels, records, "cycle")
    return operating_points(y, p, pats, n_boot=n_boot, seed=0)


def differences(rows: list[dict], records: dict, n_boot: int) -> list[dict]:
    """Each system minus RespiraMFM, per task and level, on the records both scored (paired patient bootstrap)."""
    from respiramfm.evaluate.paired import bootstrap_auroc_difference

    ref = {r["task"]: r for r in rows if r["system"] == REFERENCE}
    out = []
    for r in rows:
        base = ref.get(r["task"])
        if r["system"] == REFERENCE or base is None:
            continue
        common = sorted(set(r["_probs"]) & set(base["_probs"]))
        for lv in ("cycle", "patient"):
            a = collapse({i: r["_probs"][i] for i in common}, r["_labels"], records, lv)
            b = collapse({i: base["_probs"][i] for i in common}, base["_labels"], records, lv)
            d = bootstrap_auroc_difference(a[1], a[2], b[2], a[3], n_boot=n_boot, seed=0).to_dict()
            out.append({"task": r["task"], "system": r["system"], "level": lv, **d})
    return out


def encoder_probe(manifest, store_dir, tasks: list[str], restrict: dict | None = None) -> dict:
    """Logistic regression on frozen embeddings, fit on train, AUROC on validation, per task.

    With ``restrict`` ({field: value}, e.g. {"device": "Meditron"}) the validation AUROC is also given
    on the validation records of that setup only (``val_auroc_restricted``)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from respiramfm.cache.view import EmbeddingStore
    from respiramfm.data.tasks import get_task

    store, recs = EmbeddingStore(store_dir), read_manifest(manifest)
    out = {}
    for name in tasks:
        task = get_task(name)
        split = {s: [(r, y) for r, y in task.select([r for r in recs if r.split == s]) if r.record_id in store]
                 for s in ("train", "val")}
        if len({y for _, y in split["train"]}) < 2:
            out[name] = {"val_auroc": math.nan, "reason": "one class in train"}
            continue
        x = {s: np.stack([store.get(r.record_id).reshape(-1) for r, _ in v]) for s, v in split.items() if v}
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        clf.fit(x["train"], [y for _, y in split["train"]])
        val, reason = auroc([y for _, y in split["val"]], clf.predict_proba(x["val"])[:, 1]) if "val" in x \
            else (math.nan, "no validation")
        out[name] = {"val_auroc": val, "reason": reason, "n_train": len(split["train"]), "n_val": len(split["val"])}
        keep = [i for i, (r, _) in enumerate(split["val"]) if restrict and _matches(r, restrict)]
        if keep:
            p = clf.predict_proba(x["val"][keep])[:, 1]
            out[name]["val_auroc_restricted"] = auroc([split["val"][i][1] for i in keep], p)[0]
            out[name]["restricted"], out[name]["n_val_restricted"] = dict(restrict), len(keep)
    return out


def _cell(d: dict, key: str = "auroc") -> str:
    v = d.get(key, math.nan)
    if v is None or not np.isfinite(v):
        return "–"
    ci = f" [{d['ci_low']:.3f}, {d['ci_high']:.3f}]" if np.isfinite(d.get("ci_low", math.nan)) else ""
    return f"{v:.3f}{ci}"


def markdown(summary: dict) -> str:
    rows, lines = summary["rows"], []
    lines += ["# real-lung: ICBHI patient-grouped CV (T4, T4R) and KAUH zero-shot (T7, T8)", "",
              f"folds: {summary['folds']}; encoder: {summary['encoder']}; LLM: {summary['llm']} "
              f"(layers: {summary['llm_layers']}); seeds: {summary['seeds']}", ""]
    for lv in LEVELS:
        lines += [f"## AUROC [95% patient-level CI], {lv} level", "",
                  "| system | " + " | ".join(summary["tasks"]) + " |", "|---|" + "---|" * len(summary["tasks"])]
        for system in summary["systems"]:
            cells = []
            for t in summary["tasks"]:
                r = next((x for x in rows if x["system"] == system and x["task"] == t), None)
                c = _cell(r["levels"][lv]) if r else "–"
                if r and r["role"] == "zero-shot" and np.isfinite(r["levels"][lv].get("fold_mean", math.nan)):
                    c += f" (folds {r['levels'][lv]['fold_mean']:.3f} ± {r['levels'][lv]['fold_std']:.3f})"
                cells.append(c)
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Restricted to one recording setup (" + "; ".join(
        f"{k}: {v}" for k, v in summary["restrict"].items()) + "), cycle / patient level", "",
        "| system | " + " | ".join(summary["tasks"]) + " |", "|---|" + "---|" * len(summary["tasks"])]
    for system in summary["systems"]:
        cells = []
        for t in summary["tasks"]:
            r = next((x for x in rows if x["system"] == system and x["task"] == t and x.get("restricted")), None)
            cells.append(f"{_cell(r['restricted']['cycle'])} / {_cell(r['restricted']['patient'])}" if r else "–")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    if summary["differences"]:
        lines += ["", "## Paired AUROC difference to respiramfm [95% CI], cycle / patient level", "",
                  "| system | " + " | ".join(summary["tasks"]) + " |", "|---|" + "---|" * len(summary["tasks"])]
        for system in [s for s in summary["systems"] if s != REFERENCE]:
            cells = []
            for t in summary["tasks"]:
                ds = {d["level"]: d for d in summary["differences"] if d["system"] == system and d["task"] == t}
                cells.append(" / ".join(_cell(ds[lv], "diff") if lv in ds else "–" for lv in ("cycle", "patient")))
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
    probe = summary.get("probe") or {}
    if probe:
        lines += ["", "## Encoder probe: logistic regression on frozen embeddings, AUROC on each fold's validation",
                  ""]
        for k, v in sorted(probe.items()):
            lines.append(f"- fold {k}: " + ", ".join(
                f"{t} {d['val_auroc']:.3f}" + (f" ({d['val_auroc_restricted']:.3f} on {d['restricted']})"
                                               if np.isfinite(d.get("val_auroc_restricted", math.nan)) else "")
                for t, d in v.items() if np.isfinite(d.get("val_auroc", math.nan))))
    lines += ["", f"counts: {summary['counts_line']}", f"wall time: {summary['total_seconds']} s", ""]
    return "\n".join(lines)


def aggregate(cfg, paths, facts: dict, evaluated: list[str], log: Callable = print) -> dict:
    """Score every system over the folds; write ``OUT/results.json`` and ``OUT/results.md``."""
    from respiramfm.data.tasks import get_task, load_tasks_yaml

    load_tasks_yaml(paths.tasks, overwrite=True)
    recs = {r.record_id: r for key in ("icbhi", "kauh") for r in read_manifest(paths.manifest(key))}
    tasks = {n: get_task(n) for n in evaluated}
    rows = [row for s in cfg.evaluate.systems for row in system_rows(cfg, paths, s, recs, tasks)]
    diffs = differences(rows, recs, cfg.evaluate.n_boot) if any(r["system"] == REFERENCE for r in rows) else []
    counts = {}
    for r in rows:  # the first system that scored a task gives its counts (every system scores the same records)
        if r["_labels"] and r["task"] not in counts:
            counts[r["task"]] = {"records": len(r["_labels"]), "positives": int(sum(r["_labels"].values())),
                                 "patients": len({patient_label(recs[i]) for i in r["_labels"]})}
    for r in rows:
        r.pop("_probs"), r.pop("_labels")
    probe = {}
    for k in range(cfg.cv.folds):
        f = paths.root / "folds" / f"fold{k}" / "probe.json"
        if f.is_file():
            probe[k] = json.loads(f.read_text())
    summary = {**facts, "tasks": list(tasks), "rows": rows, "differences": diffs, "task_counts": counts,
               "probe": probe, "restrict": dict(cfg.cv.restrict or {}), "kauh_scored_configurations": 1,
               "counts_line": "; ".join(f"{t}: {c['records']} records ({c['positives']} positive), "
                                        f"{c['patients']} patients" for t, c in counts.items())}
    atomic_write_json(paths.root / "results.json", summary)
    text = markdown(summary)
    atomic_write_text(paths.root / "results.md", text)
    log("\n" + text)
    log(f"   results: {paths.root / 'results.md'}")
    return summary


__all__ = ["LEVELS", "aggregate", "collapse", "differences", "encoder_probe", "fold_predictions", "markdown",
           "pooled", "system_rows"]
