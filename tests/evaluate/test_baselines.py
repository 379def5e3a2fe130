"""BTS-style, RespiraMFM modes / missing text, data-efficiency curve — on the production formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from testkit.finetune_synth import make_synth

from respiramfm.evaluate import baselines  # noqa: E402
from respiramfm.evaluate.efficiency import data_efficiency, nested_subsets  # noqa: E402
from respiramfm.evaluate.config import EvaluateConfig  # noqa: E402
from respiramfm.evaluate.data import load_eval_data  # noqa: E402
from respiramfm.evaluate.registry import describe, get_system  # noqa: E402

TINY = {"model.backbone": "tiny-llama", "model.tiny": {"hidden_size": 64, "num_layers": 2, "heads": 4},
        "model.lora.r": 4, "model.lora.alpha": 8, "model.lora.dropout": 0.0, "threads": 1,
        "budget": {"optim": {"lr": 0.003, "weight_decay": 0.0}, "batch_size": 4, "epochs": 1}}


pytestmark = pytest.mark.usefixtures("one_thread")


def eval_data(s):
    return load_eval_data(EvaluateConfig(manifests=[str(s.manifest)], task_files=[str(s.tasks)],
                                         audio_store=[str(s.store)], projector=str(s.projector)))


def test_all_systems_registered_with_the_protocol():
    for name in ("respllm", "no_alignment", "no_alignment_linear", "bts_frozen", "audio_only", "text_only",
                 "missing_text", "qwen2_audio"):
        assert callable(get_system(name))
    assert "linear" in describe("no_alignment_linear") and "paper" in describe("no_alignment_linear")
    assert "CLAP" in describe("bts_frozen") and "frozen" in describe("bts_frozen")
    assert describe("bts_frozen") == baselines.BTS_LABEL


def test_minilm_embeddings_are_384d_unit_and_padding_invariant():
    alone = baselines.minilm_embed(["fever; dry cough"])
    batch = baselines.minilm_embed(["fever; dry cough", "a much longer sentence about wheezing and chest pain"])
    assert alone.shape == (1, 384) and np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert np.allclose(alone[0], batch[0], atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-2)


def test_bts_frozen_predicts_every_test_record_and_selection_ignores_test(synth, tmp_path):
    other = make_synth(tmp_path / "other", flip_test=True, extra_test=3)  # same train/val, different test
    da, db = eval_data(synth), eval_data(other)
    pa = baselines.bts_frozen(da, 0, tmp_path / "wa", {})
    pb = baselines.bts_frozen(db, 0, tmp_path / "wb", {})
    for name in ("FT-A", "FT-B", "FT-Z"):
        want = {r.record_id for r, _ in da.examples(name, "test")}
        assert set(pa[name]) == want and all(0.0 <= p <= 1.0 for p in pa[name].values())
    ia = json.loads((tmp_path / "wa" / "training.json").read_text())
    ib = json.loads((tmp_path / "wb" / "training.json").read_text())
    assert ia == ib and ia["selected_on"] == "validation" and "CLAP" in ia["label"]
    assert sorted(map(float, ia["val_auroc_by_C"])) == [0.01, 0.1, 1.0, 10.0]
    assert ia["val_auroc_by_C"][str(ia["C"])] == max(ia["val_auroc_by_C"].values())
    shared = set(pa["FT-Z"])
    assert all(abs(pa["FT-Z"][k] - pb["FT-Z"][k]) < 1e-9 for k in shared)
    from respiramfm.evaluate.metrics import auroc

    ys = [y for _, y in da.examples("FT-A", "test")]
    ps = [pa["FT-A"][r.record_id] for r, _ in da.examples("FT-A", "test")]
    assert auroc(ys, ps)[0] > 0.7  # labels are carried by both modalities: a linear model finds them


def test_modes_and_missing_text(synth, tmp_path):
    from respiramfm.models.sequence import FusionItem

    data = eval_data(synth)
    opts = dict(TINY)
    audio = baselines.audio_only(data, 0, tmp_path / "a", opts)
    text = baselines.text_only(data, 0, tmp_path / "t", opts)
    for preds in (audio, text):
        for name in ("FT-A", "FT-B", "FT-Z"):
            assert set(preds[name]) == {r.record_id for r, _ in data.examples(name, "test")}
            assert all(0.0 <= p <= 1.0 for p in preds[name].values())
    model, cfg = baselines._finetuned(data, 0, tmp_path / "m", opts, "multimodal")
    ex = baselines.build_test_examples(data, True, cfg.audio_store)
    full = baselines.predict_fusion(model, ex)
    missing = baselines.predict_fusion(model, ex, drop_context=True)
    assert not np.allclose(full, missing)  # the context mattered
    items = [FusionItem(task=e.task, audio=ex.audio[e.row], context=None, audio_type=e.audio_type)
             for e in ex.examples[:6]]
    assert np.allclose(model.predict_proba(items), missing[:6], atol=1e-5)  # == audio-only inference


def test_nested_patient_subsets(synth):
    data = eval_data(synth)
    s0 = nested_subsets(data.records, (0.01, 0.25, 0.5, 1.0), seed=0)
    train = {(r.dataset, r.patient_id) for r in data.split("train")}
    assert s0[1.0] == train
    assert s0[0.01] <= s0[0.25] <= s0[0.5] <= s0[1.0]
    assert {d for d, _ in s0[0.01]} == {d for d, _ in train}  # every dataset keeps a patient
    assert len(s0[0.25]) == sum(int(np.ceil(0.25 * 24)) for _ in range(2))
    assert s0 == nested_subsets(data.records, (0.01, 0.25, 0.5, 1.0), seed=0)
    assert nested_subsets(data.records, (0.25,), seed=1)[0.25] != s0[0.25]


def test_data_efficiency_curve_writes_plot_data_and_resumes(synth, tmp_path):
    data = eval_data(synth)
    seen = []

    def fit(sub, seed, work, options):
        seen.append({(r.dataset, r.patient_id) for r in sub.split("train")})
        assert len(sub.split("val")) == len(data.split("val")) and len(sub.split("test")) == len(data.split("test"))
        return baselines.bts_frozen(sub, seed, work, options)

    out = data_efficiency(data, "bts_frozen", tmp_path / "eff", seeds=(0,), fractions=(0.1, 0.5, 1.0),
                          fit_predict=fit, log=lambda *_: None)
    assert [len(s) for s in seen] == [6, 24, 48]
    saved = json.loads((tmp_path / "eff" / "data_efficiency.json").read_text())
    assert saved["fractions"] == [0.1, 0.5, 1.0] and saved["metric"] == "mean supervised AUROC"
    curve = saved["systems"]["bts_frozen"]["mean"]
    assert len(curve) == 3 and all(v is None or 0.0 <= v <= 1.0 for v in curve) and curve[-1] is not None
    assert "| 0.5 |" in (tmp_path / "eff" / "data_efficiency.md").read_text()

    def boom(*a):
        raise AssertionError("should resume from the saved predictions")

    again = data_efficiency(data, "bts_frozen", tmp_path / "eff", seeds=(0,), fractions=(0.1, 0.5, 1.0),
                            fit_predict=boom, log=lambda *_: None)
    assert again["systems"] == out["systems"]
