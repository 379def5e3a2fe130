"""The shared-prompt KV cache: same logits and same gradients as full per-sample sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from respiramfm.models.configuration import LoraSettings
from respiramfm.fusion.infer import (expand_kv, items_to_resolved, plain_logits, predict_logits, predict_proba,
                                     prefix_kv, shared_prefix_logits)
from respiramfm.models.fusion import RespiraMFM
from respiramfm.models.sequence import FusionItem
from testkit.tiny_models import tiny_fusion

IN_DIM = 16
CONTEXTS = [
    "Gender: male. Age: 70. Record location: trachea. Patient presents with the following respiratory "
    "symptoms: dry cough, fever, fatigue. Smoking status: smoker.",
    "Patient presents with no obvious respiratory symptoms.",
    "Gender: female. Age: 3.",
    "",
]



def make_model(arch: str = "llama", seed: int = 0, **cfg_kw) -> RespiraMFM:
    """A tiny model whose LoRA B matrices and head are non-zero, so adapters matter."""
    tiny = {"hidden_size": 64, "num_layers": 2, "heads": 4}
    if arch == "phi":
        tiny["resid_pdrop"] = 0.0
    cfg_kw.setdefault("lora", LoraSettings(r=4, alpha=8, dropout=0.0))
    return tiny_fusion(arch, seed, in_dim=IN_DIM, head_std=1.0, tiny=tiny, **cfg_kw)


def items(seed: int = 0) -> list[FusionItem]:
    rng = np.random.default_rng(seed)
    out = []
    for task, kind in (("T1", "cough"), ("T4", "lung")):
        for c in CONTEXTS:
            out.append(FusionItem(task=task, audio=rng.standard_normal(IN_DIM).astype(np.float32), context=c,
                                  audio_type=kind, label=int(rng.integers(2))))
    out.append(FusionItem(task="T1", audio=None, context=CONTEXTS[0], label=1))  # text-only prompt: its own group
    return out


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_cached_inference_matches_the_uncached_path(arch):
    model = make_model(arch)
    its = items()
    with torch.no_grad():
        reference = model(model.collate(its))
    assert reference.abs().max() > 1.0  # the logits are not trivially small
    resolved = items_to_resolved(model, its)
    for bs in (1, 3, 32):  # 3: every batch is padded (lengths differ within a prompt group)
        cached = predict_logits(model, resolved, batch_size=bs)
        assert (cached - reference).abs().max() < 1e-4, bs
    plain = predict_logits(model, resolved, batch_size=4, use_cache=False)
    assert (plain - reference).abs().max() < 1e-4
    probs = predict_proba(model, resolved)
    np.testing.assert_allclose(probs, torch.softmax(reference.double(), -1)[:, 1].numpy(), atol=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_audio_first_order_is_batched_by_length_and_matches_the_reference(padding_side):
    """The paper order [audio | prompt | context] has no shared prefix: length-sorted batches, same logits."""
    model = make_model("llama", order=["audio", "prompt", "context"], padding_side=padding_side)
    its = items()
    with torch.no_grad():
        reference = model(model.collate(its))
    resolved = items_to_resolved(model, its)
    for bs in (1, 3, 32):
        got = predict_logits(model, resolved, batch_size=bs)
        assert (got - reference).abs().max() < 1e-4, bs
    torch.testing.assert_close(predict_logits(model, resolved, batch_size=3, use_cache=False), reference,
                               rtol=0, atol=1e-4)


def test_right_padded_suffix_after_the_cache_is_exercised():
    model = make_model("llama")
    resolved = items_to_resolved(model, items()[:4])
    prefix = tuple(resolved[0].segments[0][1])
    from respiramfm.models.sequence import collate

    batch = collate(resolved, model.backbone.pad_token_id, "right", prefix=list(prefix))
    assert (batch.attention_mask == 0).any()  # some rows are padded
    assert int(batch.position_ids[0, 0]) == len(prefix)  # positions continue after the prefix


def test_expanded_cache_does_not_alter_the_prefix_cache():
    model = make_model("llama")
    resolved = items_to_resolved(model, items()[:4])
    prefix = tuple(resolved[0].segments[0][1])
    with torch.no_grad():
        cache = prefix_kv(model, prefix)
        before = [layer.keys.clone() for layer in cache.layers]
        first = predict_logits(model, resolved, batch_size=2)
        big = expand_kv(model, cache, 5)
    assert big.layers[0].keys.shape[0] == 5 and cache.layers[0].keys.shape[0] == 1
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, cache.layers))
    torch.testing.assert_close(predict_logits(model, resolved, batch_size=2), first)


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_training_prefix_sharing_gives_the_same_gradients(arch):
    model = make_model(arch)
    model.train()
    resolved = items_to_resolved(model, items())
    labels = torch.tensor([r.label for r in resolved])
    grads = []
    for fn in (plain_logits, shared_prefix_logits):
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(fn(model, resolved), labels)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for n in grads[0]:
        assert grads[0][n].abs().max() > 0, n  # every adapter gets a gradient through the cached prompt
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)


def test_order_without_a_leading_prompt_falls_back_to_the_plain_path():
    model = make_model("llama", order=["audio", "prompt", "context"])
    its = items()
    with torch.no_grad():
        reference = model(model.collate(its))
    resolved = items_to_resolved(model, its)
    assert (predict_logits(model, resolved, batch_size=3) - reference).abs().max() < 1e-4
    with torch.no_grad():
        assert (shared_prefix_logits(model, resolved) - reference).abs().max() < 1e-4


def test_predict_restores_training_mode():
    model = make_model("llama")
    model.train()
    predict_logits(model, items_to_resolved(model, items()[:2]))
    assert model.training and not model.projector.training
