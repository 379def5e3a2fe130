"""What a task is (:class:`Task`) and the nine paper tasks, T1-T9 (docs/paper.md §6).

A task says which records it draws from and what label 1 means. Label 1 always
means *the condition is present*, so one binary head serves every task,
including zero-shot tasks on unseen datasets and unseen diseases. The registry
that finds tasks by name (these and user-defined ones) is :mod:`respiramfm.data.tasks`.

Labels use the canonical diagnosis strings of :mod:`respiramfm.data.datasets`;
label 1 is always "condition present". Prompt wording lives in ``extra``:
``negative_class`` / ``positive_class`` are the class names the prompt lists
(RespiraMFM's "non-COVID19, COVID19", "Non-TB, TB", "healthy, COPD"...), and
``subject`` is "participant" for the COVID/TB sets and "person" for the lung-sound
sets, as in the official prompts.

Decisions worth knowing:

* **T3 (TBscreen)** has no public data. The task is defined on dataset name
  ``tbscreen`` with diagnoses ``tb`` / ``non-tb``, so a user's own CSV feeds it via
  ``respiramfm prepare generic --dataset tbscreen --diagnosis-map ...``.
* **T2 (Coughvid)** keeps recordings whose ``cough_detected`` score is at least 0.8
  (OPERA's COVID task; RespiraMFM's own filter is unpublished). The threshold lives
  in ``extra['min_extra']`` and is applied by :meth:`Task.label`.
* **T5 (Coswara)** uses the ``cough-shallow`` recording (``extra['require_extra']``)
  and leaves out recordings whose quality label is "bad" (``extra['exclude_extra']``).
* **T7-T9 (KAUH)** match single diagnoses exactly: comorbid recordings such as
  "heart failure + copd" or "asthma + lung fibrosis" belong to neither class. That
  gives the paper's T7 size, 27 COPD + 105 normal recordings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from respiramfm.errors import ConfigError

ROLES = ("supervised", "zero-shot")


@dataclass(frozen=True)
class Task:
    name: str                      # e.g. "T4"
    dataset: str                   # Record.dataset value(s) the task draws from
    disease: str                   # short name used in class lists, e.g. "COPD"
    disease_phrase: str            # prompt phrase, e.g. "Chronic obstructive pulmonary disease (COPD)"
    positive: tuple[str, ...]      # Record.diagnosis values labelled 1
    negative: tuple[str, ...]      # Record.diagnosis values labelled 0
    audio_type: str = ""           # restrict to records of this audio type ("" = any)
    role: str = "supervised"       # "supervised" (trained + tested in-domain) or "zero-shot"
    description: str = ""          # dataset description sentence for the prompt
    unseen_disease: bool = False   # zero-shot on a disease never trained on
    simulated: bool = False        # drawn from the simulated cohort (never evidence about patients)
    # Record filters on ``record.extra`` (kept through YAML round trips):
    #   min_extra: {key: threshold}   keep records whose extra[key] is a number >= threshold
    #   require_extra: {key: [values]} keep records whose extra[key] is one of values
    #   exclude_extra: {key: [values]} drop records whose extra[key] is one of values
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConfigError(f"task {self.name}: role must be one of {ROLES}, got {self.role!r}")
        overlap = set(self.positive) & set(self.negative)
        if overlap:
            raise ConfigError(f"task {self.name}: diagnoses {sorted(overlap)} are both positive and negative")

    def label(self, record) -> int | None:
        """1 / 0 for records in the task, ``None`` for records outside it."""
        if record.dataset != self.dataset:
            return None
        if self.audio_type and record.audio_type and record.audio_type != self.audio_type:
            return None
        if record.diagnosis in self.positive:
            y = 1
        elif record.diagnosis in self.negative:
            y = 0
        else:
            return None
        return y if self._passes_extra_filters(record.extra or {}) else None

    def _passes_extra_filters(self, rx: dict) -> bool:
        for key, threshold in (self.extra.get("min_extra") or {}).items():
            v = rx.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < threshold:
                return False
        for key, values in (self.extra.get("require_extra") or {}).items():
            if rx.get(key) not in values:
                return False
        for key, values in (self.extra.get("exclude_extra") or {}).items():
            if rx.get(key) in values:
                return False
        return True

    def select(self, records: Iterable) -> list[tuple[object, int]]:
        """(record, label) pairs of the task, in input order."""
        out = []
        for r in records:
            y = self.label(r)
            if y is not None:
                out.append((r, y))
        return out


DESCRIPTIONS: dict[str, str] = {
    "ukcovid19": "This data comes from the UK COVID-19 Vocal Audio Dataset.",
    "coughvid": "This data comes from the CoughVID dataset.",
    "tbscreen": "This data comes from the TBscreen dataset.",
    "icbhi": "This data comes from the ICBHI Respiratory Sound Database Dataset.",
    "coswara": "This data comes from the Coswara Covid-19 dataset.",
    "codatb": "This data comes from the CODA TB DREAM CHALLENGE dataset.",
    "kauh": ("This data comes from the KAUH lung sound dataset, containing lung sounds recorded from the "
             "chest wall using an electronic stethoscope."),
}

COVID = dict(disease="COVID19", disease_phrase="COVID-19")
TB = dict(disease="TB", disease_phrase="Tuberculosis (TB)")
COPD = dict(disease="COPD", disease_phrase="Chronic obstructive pulmonary disease (COPD)")


def _extra(neg: str, subject: str, **more) -> dict:
    return {"negative_class": neg, "subject": subject, **more}


TASKS: tuple[Task, ...] = (
    Task("T1", "ukcovid19", **COVID, positive=("covid",), negative=("non-covid",), audio_type="cough",
         role="supervised", description=DESCRIPTIONS["ukcovid19"], extra=_extra("non-COVID19", "participant")),
    Task("T2", "coughvid", **COVID, positive=("covid",), negative=("healthy",), audio_type="cough",
                 role="supervised", description=DESCRIPTIONS["coughvid"],
                 extra=_extra("non-COVID19", "participant", min_extra={"cough_detected": 0.8})),
    Task("T3", "tbscreen", **TB, positive=("tb",), negative=("non-tb",), audio_type="cough", role="supervised",
         description=DESCRIPTIONS["tbscreen"],
         extra=_extra("Non-TB", "participant", data="not public; prepare your own with `respiramfm prepare generic "
                                                    "--dataset tbscreen` and diagnoses tb / non-tb")),
    Task("T4", "icbhi", **COPD, positive=("copd",), negative=("healthy",), audio_type="lung", role="supervised",
         description=DESCRIPTIONS["icbhi"], extra=_extra("healthy", "person")),
    Task("T5", "coswara", **COVID, positive=("covid",), negative=("healthy",), audio_type="cough",
                 role="zero-shot", description=DESCRIPTIONS["coswara"],
                 extra=_extra("non-COVID19", "participant", exclude_extra={"quality": ["bad"]},
                              require_extra={"modality": ["cough-shallow"]})),
    Task("T6", "codatb", **TB, positive=("tb",), negative=("non-tb",), audio_type="cough", role="zero-shot",
         description=DESCRIPTIONS["codatb"], extra=_extra("Non-TB", "participant")),
    Task("T7", "kauh", **COPD, positive=("copd",), negative=("healthy",), audio_type="lung", role="zero-shot",
         description=DESCRIPTIONS["kauh"], extra=_extra("healthy", "person")),
    Task("T8", "kauh", disease="asthma", disease_phrase="asthma", positive=("asthma",), negative=("healthy",),
         audio_type="lung", role="zero-shot", description=DESCRIPTIONS["kauh"], unseen_disease=True,
         extra=_extra("healthy", "person")),
    Task("T9", "kauh", disease="pneumonia", disease_phrase="pneumonia", positive=("pneumonia",),
         negative=("healthy",), audio_type="lung", role="zero-shot", description=DESCRIPTIONS["kauh"],
         unseen_disease=True, extra=_extra("healthy", "person")),
)
