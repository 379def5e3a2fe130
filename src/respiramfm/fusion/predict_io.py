"""Resumable output files for ``respiramfm predict`` (its inputs go through
:mod:`respiramfm.models.processing`).

Batch prediction keeps a hidden JSON-lines progress file next to the output.
Each finished record (prediction or error) is appended and flushed, so a killed
job resumes without redoing work; the progress file names the model, task and
manifest, and progress from a different run is never mixed in. The final CSV and
errors TSV are written atomically, then the progress file is removed.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from respiramfm.utils.io import atomic_write_json, atomic_write_text, csv_row

CSV_FIELDS = ["record_id", "patient_id", "dataset", "split", "task", "label", "probability", "decision",
              "threshold", "modalities_used", "warnings"]
ERROR_FIELDS = ["record_id", "path", "error"]
class ProgressLog:
    """Append-only record of finished rows and errors for one (model, task, manifest) run."""

    def __init__(self, out: Path, header: dict, resume: bool = True):
        self.path = out.with_name(f".{out.name}.progress.jsonl")
        self.header = dict(header)
        self.rows: dict[str, dict] = {}
        self.errors: dict[str, dict] = {}
        if resume and self.path.is_file():
            self._load()
        else:
            self._start()

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"header": self.header}) + "\n")

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            head = json.loads(lines[0]).get("header") if lines else None
        except json.JSONDecodeError:
            head = None
        if head != self.header:  # another model/task/manifest: start over
            self._start()
            return
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: that record is simply redone
                continue
            target = self.rows if entry.get("kind") == "row" else self.errors
            target[entry["data"]["record_id"]] = entry["data"]
        for rid in self.rows:
            self.errors.pop(rid, None)

    def done(self, record_id: str) -> bool:
        return record_id in self.rows or record_id in self.errors

    def _append(self, kind: str, data: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"kind": kind, "data": data}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def row(self, data: dict) -> None:
        self.rows[data["record_id"]] = data
        self._append("row", data)

    def error(self, record_id: str, path: str, cause: str) -> None:
        data = {"record_id": record_id, "path": path, "error": " ".join(str(cause).split())}
        self.errors[record_id] = data
        self._append("error", data)


def _table(fields: list[str], rows, delimiter: str = ",") -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, delimiter=delimiter, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(csv_row({k: r.get(k, "") for k in fields}))  # formula-looking cells neutralised
    return buf.getvalue()


def write_outputs(log: ProgressLog, out: Path, errors: Path) -> tuple[int, int]:
    """Write the predictions CSV and errors TSV atomically, then drop the progress file."""
    atomic_write_text(out, _table(CSV_FIELDS, log.rows.values()))
    atomic_write_text(errors, _table(ERROR_FIELDS, log.errors.values(), delimiter="\t"))
    log.path.unlink(missing_ok=True)
    return len(log.rows), len(log.errors)


def manifest_metrics(rows, threshold: float | None, n_boot: int = 1000) -> dict | None:
    """AUROC with a patient-level 95% CI, the operating points and the decision counts at the model's
    threshold over the rows that carry a label; None when no row does.

    Patients are ``dataset/patient_id`` (ids are only unique within a dataset).
    """
    import numpy as np

    from respiramfm.evaluate.metrics import bootstrap_auroc
    from respiramfm.evaluate.operating import at_threshold, operating_points

    labelled = [r for r in rows if str(r.get("label", "")) != ""]
    if not labelled:
        return None
    y = np.array([int(r["label"]) for r in labelled])
    p = np.array([float(r["probability"]) for r in labelled])
    patients = [f"{r['dataset']}/{r['patient_id']}" for r in labelled]
    out = {"n_labelled": len(labelled), "n_unlabelled": len(list(rows)) - len(labelled), "n_boot": n_boot,
           "auroc": bootstrap_auroc(y, p, patients, n_boot=n_boot, seed=0).to_dict(),
           "operating_points": operating_points(y, p, patients, n_boot=n_boot, seed=0),
           "at_threshold": at_threshold(y, p, threshold) if threshold is not None else None}
    return _finite(out)


def _finite(x):
    """JSON-safe: NaN/inf -> None (the CLI prints strict JSON)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and x != x or x in (float("inf"), float("-inf")):
        return None
    return x


def write_metrics(out: Path, metrics: dict) -> Path:
    """``OUT.metrics.json`` beside the predictions CSV."""
    path = out.with_name(out.stem + ".metrics.json")
    atomic_write_json(path, metrics)
    return path
