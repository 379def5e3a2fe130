"""The nine paper tasks, T1-T9 (REFERENCE section 6), registered on import.

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


from respiramfm.data.tasks import Task, register

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

for _task in TASKS:
    register(_task)
