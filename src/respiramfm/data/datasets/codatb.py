"""CODA TB DREAM Challenge, "Train" portion (Synapse syn31472953; terms unverified).

**The public details of this dataset are unverified**: access needs a Synapse account
and a data-use agreement, and RespiraMFM does not publish how it built its split. This
adapter reads the layout the challenge is reported to ship (column names taken from
public analysis code, not from the data itself)::

    ROOT/meta_data/Clinical/CODA_TB_Clinical_Meta_Info.csv       one row per participant
    ROOT/meta_data/Cough Metadata/CODA_TB_Solicited_Meta_Info.csv one row per solicited cough
    ROOT/raw_data/solicited_data/**/<filename>                    the cough recordings

(the two CSVs and ``solicited_data/`` may also sit directly in ROOT).

Expected columns. Clinical: ``participant``, ``tb_status`` (1 = TB, 0 = not TB) are
required; ``sex`` (Male/Female), ``age``, ``height``, ``weight``,
``reported_cough_dur`` (days), ``tb_prior`` (Yes/No/Not sure), ``hemoptysis``,
``weight_loss``, ``fever``, ``night_sweats``, ``smoke_lweek`` (Yes/No),
``heart_rate``, ``temperature`` are used when present. Solicited: ``participant``
and ``filename`` are required; ``sound_prediction_score`` is kept in ``extra``.

One record per solicited cough (patient = participant, so a participant's coughs
never straddle splits). A participant with no listed cough is kept as one
metadata-only record. Diagnosis: ``"tb"`` / ``"non-tb"`` (the negatives are people
evaluated for TB, not healthy controls). "Not sure" answers count as unreported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from respiramfm.data.datasets.common import (
    AdapterResult, clean, join_phrases, parse_age, parse_bool, parse_float, parse_sex, read_csv,
)
from respiramfm.data.records import Record
from respiramfm.data.templates import render_context
from respiramfm.errors import DataError

CLINICAL = ("meta_data/Clinical/CODA_TB_Clinical_Meta_Info.csv", "CODA_TB_Clinical_Meta_Info.csv")
SOLICITED = ("meta_data/Cough Metadata/CODA_TB_Solicited_Meta_Info.csv", "CODA_TB_Solicited_Meta_Info.csv")
AUDIO_DIRS = ("raw_data/solicited_data", "solicited_data")
STATUS = {"1": "tb", "1.0": "tb", "0": "non-tb", "0.0": "non-tb"}
SYMPTOMS = {"hemoptysis": "coughing up blood", "weight_loss": "weight loss", "fever": "fever",
            "night_sweats": "night sweats"}
NUMERIC_EXTRA = ("height", "weight", "heart_rate", "temperature", "reported_cough_dur")


def _find(root: Path, candidates: tuple[str, ...], what: str) -> Path:
    for c in candidates:
        if (root / c).exists():
            return root / c
    raise DataError(f"{what} not found (looked for {list(candidates)})", path=root)


def _symptoms(row: dict[str, str]) -> str:
    phrases, answered = [], True
    days = parse_float(row.get("reported_cough_dur"))
    if days is not None and days > 0:
        phrases.append(f"cough for {days:g} days")
    elif days is None:
        answered = False
    for col, phrase in SYMPTOMS.items():
        b = parse_bool(row.get(col))
        if b:
            phrases.append(phrase)
        elif b is None:
            answered = False
    if phrases:
        return join_phrases(phrases)
    return "none" if answered else ""


def load_codatb(root: str | Path, **_opts) -> AdapterResult:
    """Records for every solicited cough of the CODA TB Train portion (see the module docstring)."""
    root = Path(root)
    clinical = read_csv(_find(root, CLINICAL, "CODA TB clinical metadata"), required=("participant", "tb_status"),
                        what="CODA TB clinical metadata")
    solicited = read_csv(_find(root, SOLICITED, "CODA TB solicited-cough metadata"),
                         required=("participant", "filename"), what="CODA TB solicited-cough metadata")
    res = AdapterResult()
    for table in (clinical, solicited):
        for _line, cause in table.bad_rows:
            res.problem(table.path, f"{cause}; row skipped")

    audio_dir = next((root / d for d in AUDIO_DIRS if (root / d).is_dir()), None)
    on_disk: dict[str, Path] = {}
    if audio_dir is None:
        res.problem(root / AUDIO_DIRS[0], "no solicited_data folder: all records are metadata-only")
    else:
        for p in sorted(audio_dir.rglob("*")):
            if p.is_file():
                on_disk.setdefault(p.name, p)

    base: dict[str, Record] = {}
    for line, row in clinical.rows:
        pid = clean(row["participant"])
        if not pid or pid in base:
            res.problem(clinical.path, f"line {line}: empty or repeated participant {pid!r}; row skipped")
            continue
        status = clean(row["tb_status"])
        diagnosis = STATUS.get(status)
        if diagnosis is None:
            res.problem(clinical.path, f"line {line}: unknown tb_status {status!r} for {pid} (expected 0/1); row skipped")
            continue
        sex, other = parse_sex(row.get("sex"))
        prior = parse_bool(row.get("tb_prior"))
        smoke = parse_bool(row.get("smoke_lweek"))
        extra: dict = {"tb_status": status}
        for col in NUMERIC_EXTRA:
            v = parse_float(row.get(col))
            if v is not None:
                extra[col] = v
        if other:
            extra["gender_text"] = other
        base[pid] = Record(
            record_id=f"codatb/{pid}", patient_id=f"codatb/{pid}", dataset="codatb", audio_type="cough",
            diagnosis=diagnosis, age=parse_age(row.get("age")), sex=sex, symptoms=_symptoms(row),
            medical_history={True: "previous tuberculosis", False: "none", None: ""}[prior],
            smoker={True: "yes", False: "no", None: ""}[smoke], extra=extra,
        )

    with_cough: set[str] = set()
    seen_files: set[str] = set()
    for line, row in solicited.rows:
        pid, fname = clean(row["participant"]), clean(row["filename"])
        if pid not in base:
            res.problem(solicited.path, f"line {line}: cough {fname!r} of participant {pid!r} has no usable "
                                        "clinical row; skipped")
            continue
        if not fname or fname in seen_files:
            res.problem(solicited.path, f"line {line}: empty or repeated filename {fname!r}; skipped")
            continue
        seen_files.add(fname)
        with_cough.add(pid)
        path = on_disk.get(Path(fname).name)
        if path is None and audio_dir is not None:
            res.problem(audio_dir / fname, "audio missing; kept as a metadata-only record")
        b = base[pid]
        extra = dict(b.extra)
        score = parse_float(row.get("sound_prediction_score"))
        if score is not None:
            extra["sound_prediction_score"] = score
        extra["filename"] = fname
        rec = dataclasses.replace(b, record_id=f"codatb/{Path(fname).stem}",
                                  audio_path=str(path.resolve()) if path else "", extra=extra)
        rec.context = render_context(rec)
        res.records.append(rec)
    for pid, b in base.items():
        if pid not in with_cough:
            res.problem(clinical.path, f"participant {pid} has no solicited cough listed; kept as a metadata-only record")
            b.context = render_context(b)
            res.records.append(b)
    return res
