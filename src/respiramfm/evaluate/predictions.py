"""The one prediction file format of an evaluation: ``record_id,patient,task,label,prob`` (CSV).

Every (system, seed) unit of the protocol and every unit of the data-efficiency curve writes
its test predictions with :func:`write_predictions` and reads them with :func:`read_predictions`.
The writer checks what a system returned: only known tasks, only test records of that task,
probabilities finite and in [0, 1]. ``patient`` is ``dataset/patient_id`` (the bootstrap's unit), with the
dataset named once (:func:`respiramfm.data.splits.patient_label`: ``kauh/P100``, not ``kauh/kauh/P100``).
Text cells that look like spreadsheet formulas are written neutralised (``utils.io.csv_cell``) and
restored on reading.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from respiramfm.data.splits import patient_label
from respiramfm.errors import DataError
from respiramfm.utils.io import atomic_write_text, csv_row, csv_value

FIELDS = ("record_id", "patient", "task", "label", "prob")


def task_key(name: str):
    """Sort key of task names: T2 before T10, SIM-T1 with the SIM tasks."""
    head, _, num = name.rpartition("T")
    return (head, int(num)) if num.isdigit() else (name, 0)


def write_predictions(path: str | os.PathLike, data, preds: dict, system: str) -> int:
    """Check ``preds`` ({task: {record_id: prob}}) against ``data``'s test split and write them atomically."""
    test = {r.record_id: r for r in data.split("test")}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FIELDS)
    n = 0
    for task in sorted(preds, key=task_key):
        if task not in data.tasks:
            raise DataError(f"system {system!r} returned predictions for unknown task {task!r}")
        labels = {r.record_id: y for r, y in data.tasks[task].select(test.values())}
        for rid, p in preds[task].items():
            if rid not in labels:
                raise DataError(f"system {system!r} predicted {rid!r} for {task}, which is not a test record of "
                                f"that task")
            if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p <= 1.0):
                raise DataError(f"system {system!r}: probability {p!r} for {rid!r} ({task}) is not in [0, 1]")
            r = test[rid]
            w.writerow(csv_row([rid, patient_label(r), task, labels[rid], repr(float(p))]))
            n += 1
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())
    return n


def read_predictions(path: str | os.PathLike) -> list[dict]:
    """The rows of a prediction file, ``label`` as int and ``prob`` as float."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [{k: csv_value(v) if isinstance(v, str) else v for k, v in r.items()} for r in csv.DictReader(fh)]
    except OSError as exc:
        raise DataError(f"cannot read predictions: {exc.strerror}", path=path) from None
    try:
        for r in rows:
            r["label"], r["prob"] = int(r["label"]), float(r["prob"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"not a prediction file (columns {', '.join(FIELDS)})", path=path) from None
    return rows


def by_task(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{task: {record_id: prob}} from :func:`read_predictions` rows (the systems' return shape)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        out.setdefault(r["task"], {})[r["record_id"]] = r["prob"]
    return out


__all__ = ["FIELDS", "by_task", "read_predictions", "task_key", "write_predictions"]
