"""Coswara (IISc, ``iiscleap/Coswara-Data``, CC BY 4.0).

Layout as published (after joining and extracting the split ``tar.gz`` parts)::

    ROOT/combined_data.csv                          one row per participant (2,746)
    ROOT/Extracted_data/<date>/<uid>/<modality>.wav audio, when extracted
    ROOT/annotations/<modality>_labels*.csv         optional quality labels (FILENAME, QUALITY; 0 = bad)

One record per participant for the chosen modality (default ``cough-shallow``, the
T5 recording). Participants whose audio is absent are kept as metadata-only records
(``audio_path`` empty) and listed in the report; nobody is dropped.

Normalisation:

* diagnosis: ``positive_mild`` / ``positive_moderate`` / ``positive_asymp`` (any
  ``positive_*``) -> ``"covid"``; ``healthy`` -> ``"healthy"``; the other statuses
  (``recovered_full``, ``no_resp_illness_exposed``, ``resp_illness_not_identified``,
  ``under_validation``) are kept as written, so no task mistakes them for either
  class. The raw status is always in ``extra['covid_status']``. The mapping
  positive_* = 1, healthy = 0 is unverified for RespiraMFM;
* symptom and comorbidity columns are checkbox flags: only an explicit ``True``
  counts. A participant with no ticked symptom answered the checklist with "none",
  so symptoms become ``"none"`` (likewise medical history);
* ``smoker`` mixes y/n and True/False: both spellings are read;
* quality labels, when the annotation files are present, go to ``extra['quality']``
  ("bad" for label 0); two participants known to have unusable audio are marked bad.
"""

from __future__ import annotations

import os
from pathlib import Path

from respiramfm.data.datasets.common import (
    AdapterResult, clean, flag_phrases, join_phrases, parse_age, parse_bool, parse_sex, read_csv,
)
from respiramfm.data.records import Record
from respiramfm.data.templates import render_context
from respiramfm.errors import DataError

METADATA = "combined_data.csv"
AUDIO_DIR = "Extracted_data"
MODALITIES = ("breathing-deep", "breathing-shallow", "cough-heavy", "cough-shallow",
              "counting-fast", "counting-normal", "vowel-a", "vowel-e", "vowel-o")
KNOWN_STATUSES = ("healthy", "positive_mild", "positive_moderate", "positive_asymp", "recovered_full",
                  "no_resp_illness_exposed", "resp_illness_not_identified", "under_validation")
KNOWN_BAD = frozenset({"C7Km0KttQRMMM6UoyocajfgZAOB3", "kgjTguvo3vZJTO7F1qO9GxEicbA3"})

SYMPTOMS = {"cold": "cold", "cough": "cough", "fever": "fever", "diarrhoea": "diarrhoea",
            "st": "sore throat", "loss_of_smell": "loss of smell and/or taste", "mp": "muscle pain",
            "ftg": "fatigue", "bd": "breathing difficulties"}
HISTORY = {"asthma": "asthma", "cld": "chronic lung disease", "pneumonia": "pneumonia", "ht": "hypertension",
           "diabetes": "diabetes", "ihd": "ischemic heart disease",
           "others_resp": "other respiratory illness", "others_preexist": "other pre-existing condition"}


def audio_type_of(modality: str) -> str:
    if modality.startswith("cough"):
        return "cough"
    if modality.startswith("breathing"):
        return "breath"
    return "speech"


def normalise_status(status: str) -> str | None:
    s = clean(status).lower()
    if s.startswith("positive"):
        return "covid"
    if s == "healthy":
        return "healthy"
    if s in KNOWN_STATUSES:
        return s
    return None


def _index_audio(audio_root: Path) -> dict[str, Path]:
    """uid -> participant folder, scanning ``Extracted_data/<date>/<uid>`` once."""
    out: dict[str, Path] = {}
    for date_dir in sorted(audio_root.iterdir()):
        if not date_dir.is_dir():
            continue
        with os.scandir(date_dir) as it:
            for entry in it:
                if entry.is_dir():
                    out.setdefault(entry.name, Path(entry.path))
    return out


def _read_quality(root: Path, modality: str, res: AdapterResult) -> dict[str, str]:
    """uid -> quality label from ``annotations/<modality>_labels*.csv`` (empty when absent)."""
    ann = root / "annotations"
    out: dict[str, str] = {}
    if not ann.is_dir():
        return out
    for path in sorted(ann.glob(f"{modality}_labels*.csv")):
        try:
            table = read_csv(path, required=("FILENAME", "QUALITY"), what="Coswara quality annotation")
        except DataError as exc:
            res.problem(path, f"quality annotation ignored: {exc.cause}")
            continue
        for line, cause in table.bad_rows:
            res.problem(path, cause)
        for _line, row in table.rows:
            uid = clean(row["FILENAME"]).split("_", 1)[0]
            q = clean(row["QUALITY"])
            out[uid] = {"0": "bad", "1": "good", "2": "excellent"}.get(q, q)
    return out


def load_coswara(root: str | Path, modality: str = "cough-shallow", **_opts) -> AdapterResult:
    """Records for every Coswara participant (see the module docstring)."""
    root = Path(root)
    if modality not in MODALITIES:
        raise DataError(f"unknown Coswara modality {modality!r}; expected one of {MODALITIES}")
    table = read_csv(root / METADATA, required=("id", "covid_status"), what="Coswara metadata")
    res = AdapterResult()
    for line, cause in table.bad_rows:
        res.problem(table.path, f"{cause}; row skipped")

    audio_root = root / AUDIO_DIR
    folders = _index_audio(audio_root) if audio_root.is_dir() else None
    if folders is None:
        res.problem(audio_root, f"no audio folder: all {len(table.rows)} participants are metadata-only records")
    quality = _read_quality(root, modality, res)

    # a checklist absent from this release is "not reported", not "none"
    none_symptoms = "none" if any(c in table.header for c in SYMPTOMS) else ""
    none_history = "none" if any(c in table.header for c in HISTORY) else ""
    seen: set[str] = set()
    for line, row in table.rows:
        uid = clean(row["id"])
        if not uid:
            res.problem(table.path, f"line {line}: empty participant id; row skipped")
            continue
        if uid in seen:
            res.problem(table.path, f"line {line}: participant {uid} listed twice; later row skipped")
            continue
        seen.add(uid)
        status = clean(row["covid_status"])
        diagnosis = normalise_status(status)
        if diagnosis is None:
            res.problem(table.path, f"line {line}: unknown covid_status {status!r} for {uid}; row skipped")
            continue

        symptoms, _ = flag_phrases(row, {k: v for k, v in SYMPTOMS.items() if k in row})
        history, _ = flag_phrases(row, {k: v for k, v in HISTORY.items() if k in row})
        smoker = {True: "yes", False: "no", None: ""}[parse_bool(row.get("smoker"))]
        sex, other = parse_sex(row.get("g"))

        extra = {"covid_status": status, "modality": modality}
        for key, col in (("test_status", "test_status"), ("vaccination", "vacc"), ("record_date", "record_date")):
            if clean(row.get(col)):
                extra[key] = clean(row.get(col))
        if other:
            extra["gender_text"] = other
        if uid in quality:
            extra["quality"] = quality[uid]
        if uid in KNOWN_BAD:
            extra["quality"] = "bad"

        audio = ""
        if folders is not None:
            folder = folders.get(uid)
            wav = folder / f"{modality}.wav" if folder is not None else None
            if wav is not None and wav.is_file():
                audio = str(wav.resolve())
            else:
                where = wav if wav is not None else audio_root / "*" / uid / f"{modality}.wav"
                res.problem(where, f"audio missing for participant {uid}; kept as a metadata-only record")

        rec = Record(
            record_id=f"coswara/{uid}/{modality}", patient_id=f"coswara/{uid}", dataset="coswara",
            audio_path=audio, audio_type=audio_type_of(modality), diagnosis=diagnosis,
            age=parse_age(row.get("a")), sex=sex,
            symptoms=join_phrases(symptoms) or none_symptoms,
            medical_history=join_phrases(history) or none_history,
            smoker=smoker, extra=extra,
        )
        rec.context = render_context(rec)
        res.records.append(rec)
    return res
