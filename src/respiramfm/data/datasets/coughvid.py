"""Coughvid (Orlandic et al. 2021, Zenodo 4048312, CC BY 4.0).

Layout as published::

    ROOT/metadata_compiled.csv     one row per submission (uuid), ~20,000 rows
    ROOT/<uuid>.webm | <uuid>.ogg  the recording, when present (decode webm with PyAV)

One record per metadata row. Coughvid has no participant identifier, so each
submission is its own patient (``coughvid/<uuid>``); repeat submitters cannot be
grouped. Rows without audio are kept as metadata-only records and reported.

Normalisation:

* diagnosis from ``status``: ``COVID-19`` -> ``"covid"``, ``healthy`` -> ``"healthy"``,
  ``symptomatic`` -> ``"symptomatic"``, blank -> ``""`` (unlabelled). Any other status
  is an unknown label: the row is reported and skipped;
* blank booleans are *not* truthy (pandas' NaN is): ``respiratory_condition`` True ->
  history "pre-existing respiratory condition", False -> "none", blank -> not reported;
  ``fever_muscle_pain`` True -> symptom "fever or muscle pain". False only says there
  was no fever or muscle pain, not that there were no symptoms (the people are
  coughing), so symptoms stay unreported and the context says "Respiratory
  symptoms: no fever or muscle pain." rather than claiming "none";
* ``cough_detected`` (the publishers' classifier score) is kept in ``extra``: the
  T2 definition follows OPERA and keeps recordings scoring at least 0.8;
* the expert annotations (``*_1``..``*_3``) are kept in ``extra`` when filled.
"""

from __future__ import annotations

from pathlib import Path

from respiramfm.data.datasets.common import (
    AdapterResult, clean, index_files, parse_age, parse_bool, parse_float, parse_sex, read_csv,
)
from respiramfm.data.records import Record
from respiramfm.data.templates import render_context

METADATA = "metadata_compiled.csv"
STATUS = {"covid-19": "covid", "healthy": "healthy", "symptomatic": "symptomatic", "": ""}
EXPERT_FIELDS = ("quality", "cough_type", "dyspnea", "wheezing", "stridor", "choking", "congestion",
                 "nothing", "diagnosis", "severity")


def load_coughvid(root: str | Path, **_opts) -> AdapterResult:
    """Records for every Coughvid metadata row (see the module docstring)."""
    root = Path(root)
    table = read_csv(root / METADATA, required=("uuid", "status", "cough_detected"), what="Coughvid metadata")
    res = AdapterResult()
    for line, cause in table.bad_rows:
        res.problem(table.path, f"{cause}; row skipped")
    audio = index_files(root, (".webm", ".ogg", ".wav"))
    if not audio:
        res.problem(root, f"no .webm/.ogg audio next to {METADATA}: all rows are metadata-only records")

    seen: set[str] = set()
    for line, row in table.rows:
        uuid = clean(row["uuid"])
        if not uuid:
            res.problem(table.path, f"line {line}: empty uuid; row skipped")
            continue
        if uuid in seen:
            res.problem(table.path, f"line {line}: uuid {uuid} listed twice; later row skipped")
            continue
        seen.add(uuid)
        status = clean(row["status"])
        diagnosis = STATUS.get(status.lower())
        if diagnosis is None:
            res.problem(table.path, f"line {line}: unknown status {status!r} for {uuid}; row skipped")
            continue

        cond = parse_bool(row.get("respiratory_condition"))
        history = {True: "pre-existing respiratory condition", False: "none", None: ""}[cond]
        fmp = parse_bool(row.get("fever_muscle_pain"))
        symptoms = "fever or muscle pain" if fmp else ""
        sex, other = parse_sex(row.get("gender"))

        extra: dict = {"status": status}
        score = parse_float(row.get("cough_detected"))
        if score is not None:
            extra["cough_detected"] = score
        if clean(row.get("datetime")):
            extra["datetime"] = clean(row.get("datetime"))
        if fmp is False:
            extra["symptoms_text"] = "no fever or muscle pain"
        if other:
            extra["gender_text"] = other
        for k in (1, 2, 3):
            expert = {f: clean(row.get(f"{f}_{k}")) for f in EXPERT_FIELDS if clean(row.get(f"{f}_{k}"))}
            if expert:
                extra[f"expert_{k}"] = expert

        path = audio.get(f"{uuid}.webm") or audio.get(f"{uuid}.ogg") or audio.get(f"{uuid}.wav")
        if path is None and audio:
            res.problem(root / f"{uuid}.webm", "audio missing (.webm/.ogg); kept as a metadata-only record")
        rec = Record(
            record_id=f"coughvid/{uuid}", patient_id=f"coughvid/{uuid}", dataset="coughvid",
            audio_path=str(path.resolve()) if path else "", audio_type="cough", diagnosis=diagnosis,
            age=parse_age(row.get("age")), sex=sex, symptoms=symptoms, medical_history=history, extra=extra,
        )
        rec.context = render_context(rec)
        res.records.append(rec)
    return res
