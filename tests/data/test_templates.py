"""Context and prompt templates: exact strings and properties over arbitrary metadata."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from respiramfm.data.records import Record
from respiramfm.data.tasks import Task, get_task
from respiramfm.data.templates import modality_word, render_context, task_prompt


def test_context_full_record():
    r = Record("x", "p", "d", audio_type="cough", age=62.0, sex="male", symptoms="dry cough; fever",
               medical_history="asthma", smoker="no")
    assert render_context(r) == ("Gender: male. Age: 62. Patient presents with the following medical history "
                                 "conditions: asthma. Patient presents with the following respiratory symptoms: dry "
                                 "cough, fever. Smoking status: non-smoker.")


def test_context_none_vs_not_reported():
    none = Record("x", "p", "d", symptoms="none", medical_history="none")
    blank = Record("x", "p", "d")
    assert "Patient presents with no obvious respiratory symptoms." in render_context(none)
    assert "Patient presents with no medical history conditions." in render_context(none)
    assert render_context(blank) == ("Gender: not reported. Age: not reported. Medical history: not reported. "
                                     "Respiratory symptoms: not reported. Smoking status: not reported.")


def test_context_lung_location_and_extras():
    r = Record("x", "p", "d", audio_type="lung", extra={"gender_text": "other", "age_text": "60+"})
    assert render_context(r) == ("Gender: other. Age: 60+. Record location: not reported. Medical history: not "
                                 "reported. Respiratory symptoms: not reported. Smoking status: not reported.")
    assert "Age: not reported." in render_context(Record("x", "p", "d", age=float("nan")))
    assert "Age: 0.75." in render_context(Record("x", "p", "d", age=0.75))


@pytest.mark.parametrize("audio_type,word", [("lung", "lung"), ("cough", "cough"), ("breath", "breathing"),
                                             ("exhalation", "exhalation"), ("speech", "speech"), ("Snore", "snore"),
                                             ("", "respiratory")])
def test_modality_word(audio_type, word):
    assert modality_word(audio_type) == word


def test_prompt_respiramfm_lung_exact():
    assert task_prompt("T7") == (
        "<|start_prompt|>Dataset description: This data comes from the KAUH lung sound dataset, containing lung "
        "sounds recorded from the chest wall using an electronic stethoscope. Task description: classify whether the "
        "person has Chronic obstructive pulmonary disease (COPD) given the following information and audio of the "
        "person's lung sounds. The 2 classes are: healthy, COPD. Please output 0 for healthy and 1 for COPD."
        "<|<end_prompt>|>")


def test_prompt_respiramfm_covid_and_no_audio():
    assert task_prompt(get_task("T1"), "exhalation") == (
        "<|start_prompt|>Dataset description: This data comes from the UK COVID-19 Vocal Audio Dataset. Task "
        "description: classify whether the participant has COVID-19 given the following information and audio of the "
        "person's exhalation sounds. The 2 classes are: non-COVID19, COVID19. Please output 0 for non-COVID19 and 1 "
        "for COVID19.<|<end_prompt>|>")
    assert task_prompt("T6", with_audio=False) == (
        "<|start_prompt|>Dataset description: This data comes from the CODA TB DREAM CHALLENGE dataset. Task "
        "description: classify whether the participant has Tuberculosis (TB) given the following information. The 2 "
        "classes are: Non-TB, TB. Please output 0 for Non-TB and 1 for TB.<|<end_prompt>|>")


def test_prompt_respllm_style():
    assert task_prompt("T8", style="respllm") == (
        "<|start_prompt|>Dataset description: This data comes from the KAUH lung sound dataset, containing lung "
        "sounds recorded from the chest wall using an electronic stethoscope. Task description: classifiy whether the "
        "person has asthma given the following information and audio of the person's lung sounds. The 2 classes "
        "are: asthma, healthy. Please output the class index, from 0 to 1.<|<end_prompt>|>")
    assert task_prompt("T8", style="respllm", with_audio=False).endswith(
        "given the following information. The 2 classes are: asthma, healthy.<|<end_prompt>|>")
    with pytest.raises(ValueError):
        task_prompt("T8", style="qwen")


def test_prompts_have_no_double_spaces_and_follow_modality():
    for name in [f"T{i}" for i in range(1, 10)]:
        for style in ("respiramfm", "respllm"):
            for with_audio in (True, False):
                p = task_prompt(name, with_audio=with_audio, style=style)
                assert "  " not in p
                if get_task(name).audio_type != "cough":
                    assert "cough" not in p
                assert ("audio of the person's" in p) == with_audio
    assert "lung sounds" in task_prompt("T4") and "cough" not in task_prompt("T4")


def test_prompt_user_task_defaults():
    t = Task("X1", "mine", "flu", "influenza", positive=("flu",), negative=("healthy",), audio_type="breath")
    assert task_prompt(t) == (
        "<|start_prompt|>Dataset description: This data comes from the mine dataset. Task description: classify "
        "whether the person has influenza given the following information and audio of the person's breathing "
        "sounds. The 2 classes are: healthy, flu. Please output 0 for healthy and 1 for flu.<|<end_prompt>|>")


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
ages = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 130).map(float))


@settings(max_examples=300, deadline=None)
@given(sex=st.one_of(st.sampled_from(["male", "female", ""]), text), age=ages,
       symptoms=st.one_of(st.sampled_from(["none", "", "cough; fever"]), text),
       history=st.one_of(st.sampled_from(["none", "", "asthma"]), text),
       smoker=st.one_of(st.sampled_from(["yes", "no", ""]), text), location=text,
       audio_type=st.sampled_from(["lung", "cough", "", "breath"]),
       extra=st.dictionaries(st.sampled_from(["gender_text", "age_text", "smoking_text", "symptoms_text", "x"]),
                             text, max_size=3))
def test_context_always_valid(sex, age, symptoms, history, smoker, location, audio_type, extra):
    r = Record("x", "p", "d", audio_type=audio_type, age=age, sex=sex, symptoms=symptoms,
               medical_history=history, smoker=smoker, location=location, extra=extra)
    out = render_context(r)
    assert out == render_context(r)  # deterministic
    assert out.startswith("Gender: ") and " Age: " in out and out.endswith(".")
    inputs = [sex, symptoms, history, smoker, location, *extra.values()]
    assert "  " not in out and "\n" not in out
    if not any(".." in v for v in inputs):
        assert ".." not in out
    if age is None or not math.isfinite(age) or age < 0:
        if not extra.get("age_text", "").strip():
            assert "Age: not reported." in out
    else:
        assert f"Age: {round(age, 2):g}." in out
    if symptoms == "none":
        assert "Patient presents with no obvious respiratory symptoms." in out
    if symptoms.strip() == "" and not extra.get("symptoms_text", "").strip(" .\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0"):
        assert "Respiratory symptoms: not reported." in out
    if smoker == "no":
        assert out.endswith("Smoking status: non-smoker.")
    if not any("nan" in v.lower() or "inf" in v.lower() for v in inputs):
        assert "nan" not in out.lower() and "inf" not in out.lower()
