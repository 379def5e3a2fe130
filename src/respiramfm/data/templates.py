"""Text the LLM reads: the patient context ``x_c`` and the task prompt ``x_p``.

**Context.** :func:`render_context` turns a :class:`Record` into sentences in the
RespLLM order (gender, age, recording location, medical history, symptoms) plus a
smoking sentence, which the paper's attention analysis ("non-smoker") implies the
RespiraMFM template had. The adapters have already mapped every dataset's codes to
canonical phrases, so this module applies no dataset-specific code maps; it only
decides wording. Two rules matter:

* a missing value is said to be missing ("Age: not reported."), never guessed, and
  never rendered as ``nan``/``None``;
* "none" (explicitly nothing) and "" (not reported) stay different: symptoms "none"
  read "Patient presents with no obvious respiratory symptoms.", symptoms "" read
  "Respiratory symptoms: not reported.".

A few explicit answers that do not fit the typed fields travel in ``record.extra``
and are rendered when present: ``gender_text`` (e.g. "other"), ``age_text`` (an age
band such as "45-54"), ``smoking_text`` (e.g. "ex-smoker") and ``symptoms_text``
(a partial answer when symptoms are not reported, e.g. "no fever or muscle pain").

The location sentence appears for lung-sound recordings (where it is a property of
the recording) and for any record that has a location; a cough has none to report.

**User metadata values.** :func:`value_text` turns one metadata value from a user
(text, a number, or a list of them, possibly nested) into the ``"; "``-joined text
the record holds. It walks the value once, without recursion, and refuses values
nested deeper than :data:`MAX_VALUE_DEPTH`, with more than :data:`MAX_VALUE_ITEMS`
items or longer than :data:`MAX_VALUE_CHARS` characters (a
:class:`~respiramfm.errors.DataError`, which the server answers with a 400).

**Prompt.** :func:`task_prompt` writes the RespiraMFM prompt (negative class first,
"Please output 0 for {neg} and 1 for {pos}.") with the official code's defects fixed:
the modality follows the recording instead of always being "cough", and the stray
double spaces are gone. ``style="respllm"`` gives RespLLM's wording (positive class
first, "classifiy" kept verbatim) for baseline reproduction.
"""

from __future__ import annotations

import math
import re

from respiramfm.data.tasks import get_task
from respiramfm.errors import DataError

START, END = "<|start_prompt|>", "<|<end_prompt>|>"  # verbatim markers of the official prompts

#: canonical ``Record.audio_type`` values and the word used in "audio of the person's {word} sounds"
AUDIO_TYPES: dict[str, str] = {
    "lung": "lung",
    "cough": "cough",
    "breath": "breathing",
    "exhalation": "exhalation",
    "speech": "speech",
}

STYLES = ("respiramfm", "respllm")


def modality_word(audio_type: str) -> str:
    """The word naming a recording type in prompts: lung -> "lung" (so "lung sounds"), cough -> "cough"...

    Unknown types are used as written (lower-cased), so a user-defined type still reads sensibly.
    """
    t = _clean(audio_type).lower()
    if not t:
        return "respiratory"
    return AUDIO_TYPES.get(t, t)


# --------------------------------------------------------------------------- user metadata values

#: Deepest list nesting in one metadata value (``["cough", ["fever"]]`` is 2 deep).
MAX_VALUE_DEPTH = 4
#: Most list items (at all levels) in one metadata value.
MAX_VALUE_ITEMS = 256
#: Longest text one metadata value may render to.
MAX_VALUE_CHARS = 4096


def value_text(value, key: str) -> str:
    """One user metadata value as text: lists joined with "; " (empty items dropped), in one linear pass."""
    parts: list[str] = []
    stack = [(value, 0)]
    items = chars = 0
    while stack:
        v, depth = stack.pop()
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            if depth >= MAX_VALUE_DEPTH:
                raise DataError(f"metadata field {key!r} is nested more than {MAX_VALUE_DEPTH} lists deep")
            items += len(v)
            if items > MAX_VALUE_ITEMS:
                raise DataError(f"metadata field {key!r} has more than {MAX_VALUE_ITEMS} items")
            stack.extend((x, depth + 1) for x in reversed(v))
            continue
        if isinstance(v, (dict, bool)) or not isinstance(v, (str, int, float)):
            raise DataError(f"metadata field {key!r} must be text or a list of text, got {type(v).__name__}")
        if isinstance(v, int) and v.bit_length() > 200:  # str() of a 4,300-digit int raises ValueError
            raise DataError(f"metadata field {key!r} holds a number too long to be a value")
        text = str(v).strip()
        chars += len(text) + 2
        if chars > MAX_VALUE_CHARS + 2:
            raise DataError(f"metadata field {key!r} is longer than {MAX_VALUE_CHARS} characters")
        if text:
            parts.append(text)
    return "; ".join(parts)


# --------------------------------------------------------------------------- context

NOT_REPORTED = "not reported"


def _clean(text) -> str:
    return re.sub(r"\s+", " ", str(text or "")).strip()


def _phrases(value: str) -> list[str]:
    out = []
    for p in str(value or "").split(";"):
        p = _clean(p).strip(" ,.")
        if p and p.lower() not in ("nan", "none") and p not in out:
            out.append(p)
    return out


def _format_age(age) -> str:
    try:
        a = float(age)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(a) or a < 0:  # NaN, infinite or negative: not a usable age
        return ""
    return f"{round(a, 2):g}"


def _gender(record) -> str:
    sex = _clean(record.sex).lower().strip(" .")
    if sex and sex not in ("nan", "none"):
        return sex
    other = _clean((record.extra or {}).get("gender_text", "")).lower().strip(" .")
    return other or NOT_REPORTED


def _age(record) -> str:
    if record.age is not None:
        a = _format_age(record.age)
        if a:
            return a
    band = _clean((record.extra or {}).get("age_text", "")).strip(" .")
    return band or NOT_REPORTED


def _history(value: str) -> str:
    v = _clean(value)
    if v.lower() == "none":
        return "Patient presents with no medical history conditions."
    items = _phrases(v)
    if not items:
        return f"Medical history: {NOT_REPORTED}."
    return "Patient presents with the following medical history conditions: " + ", ".join(items) + "."


def _symptoms(value: str, note: str = "") -> str:
    v = _clean(value)
    if v.lower() == "none":
        return "Patient presents with no obvious respiratory symptoms."
    items = _phrases(v)
    if not items:
        return f"Respiratory symptoms: {_clean(note).strip(' .') or NOT_REPORTED}."
    return "Patient presents with the following respiratory symptoms: " + ", ".join(items) + "."


def _smoking(record) -> str:
    s = _clean(record.smoker).lower()
    if s == "yes":
        return "Smoking status: smoker."
    if s == "no":
        return "Smoking status: non-smoker."
    text = _clean((record.extra or {}).get("smoking_text", "")).strip(" .")
    return f"Smoking status: {text or NOT_REPORTED}."


def render_context(record) -> str:
    """The patient context sentence block for ``record`` (deterministic, never empty)."""
    parts = [f"Gender: {_gender(record)}.", f"Age: {_age(record)}."]
    location = _clean(record.location).strip(" .")
    if location or _clean(record.audio_type).lower() == "lung":
        parts.append(f"Record location: {location or NOT_REPORTED}.")
    parts.append(_history(record.medical_history))
    parts.append(_symptoms(record.symptoms, (record.extra or {}).get("symptoms_text", "")))
    parts.append(_smoking(record))
    return " ".join(parts)


# --------------------------------------------------------------------------- prompt

def _task(task):
    if isinstance(task, str):
        return get_task(task)
    return task


def class_names(task) -> tuple[str, str]:
    """(negative, positive) class names as the prompts spell them, e.g. ("healthy", "COPD")."""
    task = _task(task)
    extra = task.extra or {}
    return _clean(extra.get("negative_class", "healthy")), _clean(extra.get("positive_class", task.disease))


def task_prompt(task, audio_type: str = "", with_audio: bool = True, style: str = "respiramfm") -> str:
    """The task prompt ``x_p`` for ``task`` (a :class:`Task` or its name).

    ``audio_type`` names the recording actually given (defaults to the task's own);
    ``with_audio=False`` drops the audio clause, for text-only runs.
    """
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {STYLES}")
    task = _task(task)
    extra = task.extra or {}
    description = _clean(task.description) or f"This data comes from the {task.dataset} dataset."
    subject = _clean(extra.get("subject", "person"))
    question = f"whether the {subject} has {_clean(task.disease_phrase) or task.disease}"
    neg, pos = class_names(task)
    word = modality_word(audio_type or task.audio_type)
    if style == "respiramfm":
        given = (f"given the following information and audio of the person's {word} sounds."
                 if with_audio else "given the following information.")
        body = (f"Dataset description: {description} Task description: classify {question} {given} "
                f"The 2 classes are: {neg}, {pos}. Please output 0 for {neg} and 1 for {pos}.")
    else:
        if with_audio:
            body = (f"Dataset description: {description} Task description: classifiy {question} "
                    f"given the following information and audio of the person's {word} sounds. "
                    f"The 2 classes are: {pos}, {neg}. Please output the class index, from 0 to 1.")
        else:
            body = (f"Dataset description: {description} Task description: classifiy {question} "
                    f"given the following information. The 2 classes are: {pos}, {neg}.")
    return START + body + END
