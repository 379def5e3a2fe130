"""Qwen2-Audio baseline on a tiny random-initialised Qwen2-Audio built here (no weights needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from respiramfm.evaluate.qwen2audio import AUDIO_TURN, Qwen2AudioScorer, fit_predict, parse_answer, question

SPECIAL = ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]


@pytest.fixture(scope="module")
def scorer(one_thread):
    from transformers import (AutoTokenizer, Qwen2AudioConfig, Qwen2AudioEncoderConfig,
                              Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, Qwen2Config,
                              WhisperFeatureExtractor)

    from respiramfm.llm import smollm

    tok = AutoTokenizer.from_pretrained(smollm.ensure_tokenizer())
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok)
    audio = Qwen2AudioEncoderConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                                    num_mel_bins=128, max_source_positions=1500)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = Qwen2AudioConfig(audio_config=audio, text_config=text,
                           audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(cfg)
    return Qwen2AudioScorer(model, processor, max_new_tokens=3)


@pytest.mark.parametrize("text,want", [
    ("1", 1), (" 0", 0), ("Answer: 1.", 1), ("The answer is 0", 0), ("yes", 1), ("No.", 0), ("healthy", 0),
    ("Positive for COVID-19", 1), ("1 or 0", None), ("", None), ("maybe", None), ("10", None), ("0.5", None),
])
def test_parse_answer(text, want):
    assert parse_answer(text) == want


def test_prompt_has_audio_turn_classes_and_context(scorer):
    from respiramfm.data.tasks import get_task

    task = get_task("T4")
    q = question(task, "Female, 70 years old. Symptoms: wheezing.")
    assert "1 = " in q and "0 = healthy" in q and "wheezing" in q
    rendered = scorer.prompt(q)
    assert AUDIO_TURN.strip() in rendered and rendered.rstrip().endswith("assistant")


def test_generation_decodes_new_tokens_and_gives_probabilities(scorer):
    rng = np.random.default_rng(0)
    answers = [scorer.answer(rng.normal(scale=0.1, size=16000 * s).astype(np.float32), "Classes: 1 = x, 0 = y.")
               for s in (1, 3)]
    for a in answers:
        assert 0.0 <= a.prob <= 1.0 and np.isfinite(a.prob)
        assert "Audio 1" not in a.text and "Classes" not in a.text  # only the new tokens were decoded
        assert a.label == parse_answer(a.text)
    assert answers[0].prob != answers[1].prob  # the audio reaches the model


def test_fit_predict_scores_test_records_with_audio(scorer, tmp_path):
    import soundfile as sf

    from respiramfm.data.records import Record, write_manifest
    from respiramfm.data.tasks import Task

    task = Task("QA-T", "qa_ds", disease="COPD", disease_phrase="COPD", positive=("copd",), negative=("healthy",),
                audio_type="lung", role="zero-shot", simulated=True)
    recs = []
    for i, (diag, split) in enumerate([("copd", "test"), ("healthy", "test"), ("copd", "train")]):
        sf.write(tmp_path / f"a{i}.wav", np.random.default_rng(i).normal(scale=0.1, size=8000), 8000)
        recs.append(Record(record_id=f"r{i}", patient_id=f"p{i}", dataset="qa_ds", audio_path=f"a{i}.wav",
                           audio_type="lung", diagnosis=diag, split=split))
    recs.append(Record(record_id="r9", patient_id="p9", dataset="qa_ds", audio_path="", audio_type="lung",
                       diagnosis="copd", split="test", symptoms="cough"))
    write_manifest(recs, tmp_path / "m.csv")

    class Data:
        manifests = [str(tmp_path / "m.csv")]
        tasks = {"QA-T": task}

        def split(self, name):
            return [r for r in recs if r.split == name]

    preds = fit_predict(Data(), 0, tmp_path / "work", {"scorer": scorer})
    assert set(preds["QA-T"]) == {"r0", "r1"}  # r2 is train, r9 has no audio
    assert all(0.0 <= p <= 1.0 for p in preds["QA-T"].values())
    assert (tmp_path / "work" / "answers.csv").read_text().count("\n") == 3
