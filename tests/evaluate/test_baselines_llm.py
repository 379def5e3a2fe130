"""RespLLM and no-alignment baselines: FlattenHead layout, the projector trains, selection ignores test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from testkit.finetune_synth import IN_DIM, make_synth

from respiramfm.data.records import read_manifest  # noqa: E402
from respiramfm.evaluate.registry import get_system  # noqa: E402
from respiramfm.errors import ConfigError  # noqa: E402
from respiramfm.evaluate.baselines_llm import EndToEndConfig, build_respllm, train_end_to_end  # noqa: E402
from respiramfm.models.configuration import FusionConfig  # noqa: E402
from respiramfm.training.config import Budget, OptimConfig  # noqa: E402

TINY = {"model.backbone": "tiny-llama", "model.tiny": {"hidden_size": 64, "num_layers": 2, "heads": 4},
        "model.lora.r": 4, "model.lora.alpha": 8, "model.lora.dropout": 0.0}
E2E = {"optim": {"lr": 0.003, "weight_decay": 0.0, "schedule": "constant"}, "batch_size": 8, "epochs": 2,
       "patience": 0, "mixing": "concat", "select_metric": "val_mean_auroc", "select_mode": "max"}


def budget(**kw) -> Budget:
    tree = {**E2E, **kw}
    return Budget(**{**tree, "optim": OptimConfig(**tree["optim"])})


pytestmark = pytest.mark.usefixtures("one_thread")


def eval_data(synth):
    from respiramfm.evaluate.protocol import EvaluateConfig, load_eval_data

    return load_eval_data(EvaluateConfig(manifests=[str(synth.manifest)], task_files=[str(synth.tasks)],
                                         audio_store=[str(synth.store)], projector=str(synth.projector)))


def tiny_cfg(**kw) -> FusionConfig:
    return FusionConfig(backbone="tiny-llama", tiny={"hidden_size": 64, "num_layers": 2, "heads": 4}, **kw)


def test_flatten_head_reads_first_channels_of_the_audio_positions_channel_major():
    model = build_respllm(tiny_cfg(n_audio_tokens=4), in_dim=IN_DIM, head="flatten", d_ff=3)
    assert model.head.in_features == 3 * 4 and model.head.out_features == 2
    hidden = torch.arange(2 * 7 * 64, dtype=torch.float32).reshape(2, 7, 64)
    audio = torch.zeros(2, 7, dtype=torch.bool)
    audio[0, 3:7] = True  # audio last
    audio[1, 0:4] = True  # audio first
    feats = model.flatten_features(hidden, audio)
    assert feats.shape == (2, 12)
    for b, start in enumerate((3, 0)):
        for c in range(3):
            for p in range(4):
                assert feats[b, c * 4 + p] == hidden[b, start + p, c]
    audio[1, 0] = False
    with pytest.raises(Exception, match="audio positions"):
        model.flatten_features(hidden, audio)
    one = build_respllm(tiny_cfg(), in_dim=IN_DIM, head="flatten")
    assert one.head.in_features == 32 and one.cfg.prompt_style == "respllm"
    assert all(p.requires_grad for p in one.projector.parameters())
    assert len(one.projector.projector) == 1  # a single Linear(in_dim, d_llm)


def _fdata(synth):
    from respiramfm.fusion.data import load_finetune_data

    return load_finetune_data([str(synth.manifest)], [str(synth.store)], [], [str(synth.tasks)])


def test_respllm_selects_a_trained_state_whose_projector_moved(synth):
    data = _fdata(synth)
    model = build_respllm(tiny_cfg(), in_dim=IN_DIM, head="flatten", seed=1, tasks=data.tasks)
    before = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    result = train_end_to_end(model, data, budget())
    assert result["steps"] > 0 and result["selected_on"] == "validation"
    assert [r["epoch"] for r in result["evals"]] == [0, 1, 2]  # untrained candidate + one per epoch, val only
    assert all(r["n_val"] == len(data.val) for r in result["evals"])
    best = result["best"]
    assert best["epoch"] > 0 and best["val_mean_auroc"] == max(r["val_mean_auroc"] for r in result["evals"])
    assert any(not torch.equal(before[n], p) for n, p in model.projector.named_parameters())


def test_gradient_reaches_respllm_projector_but_not_respiramfm_projector(synth):
    from respiramfm.config import load_config
    from respiramfm.evaluate.baselines_llm import prepare_raw, resolved_batch
    from respiramfm.fusion.infer import shared_prefix_logits
    from respiramfm.fusion.train import FinetuneConfig, build_model, finetune

    data = _fdata(synth)
    e2e = build_respllm(tiny_cfg(n_audio_tokens=1), in_dim=IN_DIM, head="last", seed=2, tasks=data.tasks)
    e2e.train()
    prep = prepare_raw(e2e, data.train)
    idx = [i for i, t in enumerate(prep.tasks) if t == "FT-A"][:4]
    loss = torch.nn.functional.cross_entropy(shared_prefix_logits(e2e, resolved_batch(e2e, prep, idx)),
                                             prep.labels[idx])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in e2e.projector.parameters())
    assert all(p.grad is None for n, p in e2e.named_parameters() if not p.requires_grad)

    cfg = load_config(FinetuneConfig, None, synth.sets(out_dir=synth.root / "ft", epochs=1))
    model = build_model(cfg, data, "cpu")
    before = {n: p.detach().clone() for n, p in model.projector.named_parameters()}
    result = finetune(cfg, data=data, model=model)
    assert result.last_step > 0
    assert not any(p.requires_grad for p in model.projector.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.projector.named_parameters())


@pytest.mark.parametrize("name", ["respllm", "no_alignment", "no_alignment_linear"])
def test_systems_predict_every_test_record_and_ignore_test_data(tmp_path, name):
    a = make_synth(tmp_path / "a")
    b = make_synth(tmp_path / "b", flip_test=True, extra_test=3)  # same train/val, different test
    opts = {**TINY, "budget": {**E2E, "epochs": 1}, "projector_hidden": 32}
    fn = get_system(name)
    pa = fn(eval_data(a), 0, tmp_path / "wa", opts)
    pb = fn(eval_data(b), 0, tmp_path / "wb", opts)
    tests = [r for r in read_manifest(a.manifest) if r.split == "test"]
    for task in ("FT-A", "FT-B", "FT-Z"):
        want = {r.record_id for r in tests if r.dataset == {"FT-A": "ft_cough", "FT-B": "ft_lung",
                                                            "FT-Z": "ft_zero"}[task]}
        assert set(pa[task]) == want
        assert all(0.0 <= v <= 1.0 for v in pa[task].values())
    # same fitted model: selection history identical, and the zero-shot test records (unchanged) score the same
    import json

    ta = json.loads((tmp_path / "wa" / "training.json").read_text())
    tb = json.loads((tmp_path / "wb" / "training.json").read_text())
    assert ta["best"] == tb["best"] and ta["evals"] == tb["evals"]
    shared = set(pa["FT-Z"]) & set(pb["FT-Z"])
    assert shared and all(abs(pa["FT-Z"][k] - pb["FT-Z"][k]) < 1e-6 for k in shared)


def test_respllm_on_a_token_grid_store_with_flatten_head(synth, tmp_path):
    """n_audio_tokens > 1 (the OPERA-CT grid of `embed --tokens`, here 4 tokens) through training and prediction."""
    import hashlib

    from respiramfm.cache import VectorCache
    from respiramfm.cache.view import write_view
    from respiramfm.evaluate.baselines_llm import predict_prepared, prepare_raw
    from respiramfm.fusion.data import load_finetune_data

    ids = [r.record_id for r in read_manifest(synth.manifest)]
    rng = np.random.default_rng(0)
    keys = [hashlib.sha256(i.encode()).hexdigest() for i in ids]
    group = VectorCache(tmp_path / "cache" / "synthetic", {"encoder": "synthetic"})
    group.put({k: rng.normal(size=(4, IN_DIM)).astype(np.float32) for k in keys}, {})
    group.scan()
    write_view(tmp_path / "tokens", group, ids, keys, (4, IN_DIM),
               {"encoder": "synthetic", "weights_hash": "none", "frontend_key": "none", "frontend": {},
                "kind": "tokens", "dim": IN_DIM, "checkpoint": None})
    data = load_finetune_data([str(synth.manifest)], [str(tmp_path / "tokens")], [], [str(synth.tasks)])
    assert data.train.audio.shape[1:] == (4, IN_DIM)
    model = build_respllm(tiny_cfg(n_audio_tokens=4), in_dim=IN_DIM, head="flatten", d_ff=8, tasks=data.tasks)
    result = train_end_to_end(model, data, budget(epochs=1))
    assert result["steps"] > 0
    probs = predict_prepared(model, prepare_raw(model, data.val))
    assert probs.shape == (len(data.val),) and ((probs >= 0) & (probs <= 1)).all()
    with pytest.raises(Exception, match="expects"):  # a pooled store does not fit a 4-token model
        prepare_raw(model, _fdata(synth).val)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_end_to_end_training_runs_its_llm_under_the_chosen_precision(synth, precision):
    """bf16 autocasts the training forward passes (the demo's CPU setting); fp32 never does."""
    data = _fdata(synth)
    model = build_respllm(tiny_cfg(), in_dim=IN_DIM, head="last", seed=1, tasks=data.tasks)
    seen: set[tuple[bool, torch.dtype]] = set()
    q_proj = model.inner_decoder().layers[0].self_attn.q_proj
    hook = q_proj.register_forward_hook(lambda m, i, o: seen.add((model.training, o.dtype)))
    try:
        result = train_end_to_end(model, data, budget(epochs=1), EndToEndConfig(precision=precision))
    finally:
        hook.remove()
    trained = {d for training, d in seen if training}
    assert trained == ({torch.bfloat16} if precision == "bf16" else {torch.float32})
    assert {d for training, d in seen if not training} == {torch.float32}  # validation stays fp32
    assert result["steps"] > 0 and all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ConfigError, match="precision"):
        EndToEndConfig(precision="fp16").validate()
