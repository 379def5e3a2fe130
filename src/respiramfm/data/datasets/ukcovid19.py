"""UK COVID-19 Vocal Audio Dataset (UKHSA / Turing-RSS, Zenodo 10043978; licence unverified).

Layout as published::

    ROOT/participant_metadata.csv   participant_identifier, age, gender, smoker_status,
                                    covid_test_result (Positive/Negative),
                                    respiratory_condition_asthma/_other, symptom_* flags,
                                    symptom_none, symptom_prefer_not_to_say, ...
    ROOT/audio_metadata.csv         participant_identifier, cough_file_name,
                                    three_cough_file_name, exhalation_file_name, sentence_file_name
    ROOT/train_test_splits.csv      participant_identifier, splits (train/val/test/long), ...
    ROOT/audio/<file name>          the recordings

One record per participant and requested modality (default: ``cough``, the T1
recording). The split is the publishers' participant-level one; the longitudinal
``long`` test set counts as test (raw value in ``extra['official_split']``).
Participants without an audio file are kept as metadata-only records and reported.

Normalisation: ``covid_test_result`` Positive -> ``"covid"``, Negative -> ``"non-covid"``
(a negative test does not make a person healthy), blank -> ``""``; other values are
unknown labels (row reported and skipped). Symptoms come from the ``symptom_*`` flags
with RespLLM's phrases; ``symptom_none`` gives ``"none"`` and
``symptom_prefer_not_to_say`` leaves symptoms unreported. Medical history comes from
the ``respiratory_condition_*`` flags. An age band (e.g. "45-54") is kept as text in
``extra['age_text']``, never turned into a made-up number.
"""

from __future__ import annotations

from pathlib import Path

from respiramfm.data.datasets.common import (
    AdapterResult, clean, index_files, join_phrases, parse_age, parse_bool, parse_sex, read_csv,
)
from respiramfm.data.records import Record
from respiramfm.data.templates import render_context
from respiramfm.errors import DataError

PARTICIPANTS, AUDIO, SPLITS = "participant_metadata.csv", "audio_metadata.csv", "train_test_splits.csv"
AUDIO_DIR = "audio"
MODALITIES = {"cough": "cough", "three_cough": "cough", "exhalation": "exhalation", "sentence": "speech"}
RESULTS = {"positive": "covid", "negative": "non-covid", "": ""}
SPLIT_MAP = {"train": "train", "val": "val", "validation": "val", "test": "test", "long": "test",
             "long_test": "test"}

SYMPTOMS = {
    "cough_any": "cough", "new_continuous_cough": "a new continuous cough",
    "runny_or_blocked_nose": "runny or blocked nose", "shortness_of_breath": "shortness of breath",
    "sore_throat": "sore throat", "abdominal_pain": "abdominal pain", "diarrhoea": "diarrhoea",
    "fatigue": "fatigue", "fever_high_temperature": "fever or a high temperature", "headache": "headache",
    "change_to_sense_of_smell_or_taste": "a change to sense of smell or taste",
    "loss_of_taste": "loss of sense of taste",
}
CONDITIONS = {"asthma": "asthma", "other": "other respiratory health condition"}
_NOT_FLAGS = {"none", "prefer_not_to_say", "onset"}


def _flags(row: dict[str, str], prefix: str, names: dict[str, str]) -> str:
    """Phrase list from ``prefix*`` flag columns: list / "none" / "" (not reported)."""
    if parse_bool(row.get(f"{prefix}prefer_not_to_say")):
        return ""
    cols = [c for c in row if c.startswith(prefix) and c[len(prefix):] not in _NOT_FLAGS]
    phrases, all_answered = [], bool(cols)
    for col in cols:
        code = col[len(prefix):]
        b = parse_bool(row[col])
        if b:
            phrases.append(names.get(code, code.replace("_", " ")))
        elif b is None:
            all_answered = False
    if phrases:
        return join_phrases(phrases)
    if parse_bool(row.get(f"{prefix}none")) or all_answered:
        return "none"
    return ""


def _smoking(raw: str) -> tuple[str, str]:
    """(smoker, smoking_text) from the free-form smoker_status answer."""
    v = clean(raw).lower()
    if not v or "prefer" in v or v in ("nan", "na", "unknown"):
        return "", ""
    if "never" in v or v in ("no", "non-smoker", "nonsmoker"):
        return "no", ""
    if v.startswith("ex") or "former" in v or "used to" in v:
        return "", "ex-smoker"
    if "current" in v or v in ("yes", "smoker") or "cigarette" in v or "vape" in v:
        return "yes", ""
    return "", v


def load_ukcovid19(root: str | Path, modality: str = "cough", **_opts) -> AdapterResult:
    """Records for every participant x modality (see the module docstring)."""
    root = Path(root)
    modalities = [m.strip() for m in modality.split(",") if m.strip()]
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        raise DataError(f"unknown UK COVID-19 modality {bad or modality!r}; expected some of {sorted(MODALITIES)}")
    people = read_csv(root / PARTICIPANTS, required=("participant_identifier", "covid_test_result"),
                      what="UK COVID-19 participant metadata")
    audio_meta = read_csv(root / AUDIO, required=["participant_identifier"] + [f"{m}_file_name" for m in modalities],
                          what="UK COVID-19 audio metadata")
    splits = read_csv(root / SPLITS, required=("participant_identifier", "splits"), what="UK COVID-19 split file")
    res = AdapterResult()
    for table in (people, audio_meta, splits):
        for _line, cause in table.bad_rows:
            res.problem(table.path, f"{cause}; row skipped")

    split_of: dict[str, str] = {}
    for line, row in splits.rows:
        pid, raw = clean(row["participant_identifier"]), clean(row["splits"]).lower()
        if raw and raw not in SPLIT_MAP:
            res.problem(splits.path, f"line {line}: unknown split {raw!r} for {pid}; left unassigned")
            continue
        split_of[pid] = raw
    files_of: dict[str, dict[str, str]] = {}
    for line, row in audio_meta.rows:
        files_of[clean(row["participant_identifier"])] = {m: clean(row[f"{m}_file_name"]) for m in modalities}
    audio_dir = root / AUDIO_DIR
    on_disk = index_files(audio_dir, (".wav", ".webm", ".ogg", ".flac", ".mp3"))
    if not on_disk:
        res.problem(audio_dir, "no audio files: all records are metadata-only")

    known = set()
    for line, row in people.rows:
        pid = clean(row["participant_identifier"])
        if not pid or pid in known:
            res.problem(people.path, f"line {line}: empty or repeated participant {pid!r}; row skipped")
            continue
        known.add(pid)
        result = clean(row["covid_test_result"])
        diagnosis = RESULTS.get(result.lower())
        if diagnosis is None:
            res.problem(people.path, f"line {line}: unknown covid_test_result {result!r} for {pid}; row skipped")
            continue
        sex, other = parse_sex(row.get("gender"))
        age = parse_age(row.get("age"))
        smoker, smoking_text = _smoking(row.get("smoker_status", ""))
        base_extra: dict = {"covid_test_result": result}
        if age is None and clean(row.get("age")) and clean(row.get("age")).lower() not in ("nan", "na", "unknown"):
            base_extra["age_text"] = clean(row.get("age"))
        if other:
            base_extra["gender_text"] = other
        if smoking_text:
            base_extra["smoking_text"] = smoking_text
        if clean(row.get("smoker_status")):
            base_extra["smoker_status"] = clean(row.get("smoker_status"))
        raw_split = split_of.get(pid, "")
        if pid not in split_of:
            res.problem(splits.path, f"participant {pid} has no split row; split left unassigned")
        elif raw_split:
            base_extra["official_split"] = raw_split
        symptoms = _flags(row, "symptom_", SYMPTOMS)
        history = _flags(row, "respiratory_condition_", CONDITIONS)

        for m in modalities:
            name = files_of.get(pid, {}).get(m, "")
            path = on_disk.get(name) if name else None
            if path is None and on_disk:
                res.problem(audio_dir / (name or f"<no {m} file listed for {pid}>"),
                            "audio missing; kept as a metadata-only record")
            rec = Record(
                record_id=f"ukcovid19/{pid}/{m}", patient_id=f"ukcovid19/{pid}", dataset="ukcovid19",
                audio_path=str(path.resolve()) if path else "", audio_type=MODALITIES[m], diagnosis=diagnosis,
                age=age, sex=sex, symptoms=symptoms, medical_history=history, smoker=smoker,
                split=SPLIT_MAP.get(raw_split, ""), extra={**base_extra, "modality": m},
            )
            rec.context = render_context(rec)
            res.records.append(rec)
    for pid in sorted(set(files_of) - known):
        res.problem(audio_meta.path, f"participant {pid} has audio but no metadata row; skipped")
    return res
