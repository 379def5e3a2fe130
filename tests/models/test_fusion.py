"""Stage-2 fusion model: sequence layout, padding, pooling, LoRA targets, frozen parts, modes.

Every model here is a tiny randomly initialised LLM of a real architecture with
the real SmolLM2 tokenizer, so tokenisation, attention masking and PEFT
injection are the production code paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from respiramfm.models.configuration import FusionConfig, LoraSettings, ProjectorConfig
from respiramfm.models.projector import build_projector
from respiramfm.errors import ConfigError, DataError
from respiramfm.models.fusion import RespiraMFM
from respiramfm.models.sequence import SEGMENT_CODE, FusionItem
from testkit.tiny_models import tiny_fusion


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

IN_DIM = 16
CTX = [
    "Gender: male. Age: 70. Record location: trachea. Patient presents with the following respiratory "
    "symptoms: dry cough, fever. Smoking status: smoker.",
    "Patient presents with no obvious respiratory symptoms.",
    "Gender: female. Age: 3.",
]


def make_model(arch: str = "llama", seed: int = 0, **cfg_kw) -> RespiraMFM:
    return tiny_fusion(arch, seed, in_dim=IN_DIM, **cfg_kw)


def audio(seed: int, n_tokens: int = 1) -> np.ndarray:
    shape = (IN_DIM,) if n_tokens == 1 else (n_tokens, IN_DIM)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def mixed_items(n_tokens: int = 1) -> list[FusionItem]:
    return [
        FusionItem(task="T4", audio=audio(1, n_tokens), context=CTX[0], audio_type="lung"),
        FusionItem(task="T4", audio=None, context=CTX[1]),              # missing audio
        FusionItem(task="T1", audio=audio(2, n_tokens), context=""),    # missing context
        FusionItem(task="T1", audio=audio(3, n_tokens), context=CTX[2]),
    ]


@pytest.mark.parametrize("arch", ["llama", "phi", "qwen2", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_each_sample_alone(arch, side):
    model = make_model(arch, padding_side=side)
    items = mixed_items()
    batch = model.collate(items)
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1  # lengths really differ: padding is exercised
    together = model(batch)
    alone = torch.cat([model(model.collate([it])) for it in items])
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-4)


def test_left_and_right_padding_give_the_same_logits():
    right, left = make_model("gpt2", padding_side="right"), make_model("gpt2", padding_side="left")
    left.load_state_dict(right.state_dict())
    items = mixed_items()
    b_left = left.collate(items)
    assert (b_left.attention_mask[:, 0] == 0).any()  # some row really is left-padded
    torch.testing.assert_close(right(right.collate(items)), left(b_left), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_embeddings_change_nothing(side):
    model = make_model("llama", padding_side=side)
    batch = model.collate(mixed_items())
    embeds = model.embed(batch)
    noisy = embeds.clone()
    pads = batch.attention_mask == 0
    assert pads.any()
    noisy[pads] = torch.randn_like(noisy[pads]) * 100.0
    args = (batch.attention_mask, batch.position_ids, batch.last_index)
    torch.testing.assert_close(model.forward_embeds(embeds, *args), model.forward_embeds(noisy, *args))
    # the same perturbation on a real token does change the result (the check above can fail)
    real = embeds.clone()
    real[0, int(batch.last_index[0]) - 1] += 5.0
    assert not torch.allclose(model.forward_embeds(real, *args)[0], model.forward_embeds(embeds, *args)[0])


@pytest.mark.parametrize("order", [["prompt", "context", "audio"], ["audio", "prompt", "context"],
                                   ["context", "audio", "prompt"]])
def test_mask_and_segments_follow_embedding_order(order):
    model = make_model("llama", order=order)
    items = mixed_items()
    batch = model.collate(items)
    for b in range(len(items)):
        real = batch.attention_mask[b] == 1
        segs = batch.segment_ids[b][real].tolist()
        # segments appear as contiguous runs, in the configured order, with no pads inside
        runs = [s for i, s in enumerate(segs) if i == 0 or segs[i - 1] != s]
        names = {v: k for k, v in SEGMENT_CODE.items()}
        assert [names[s] for s in runs] == [o for o in order if o == "prompt" or
                                            (o == "audio" and "audio" in batch.modalities[b]) or
                                            (o == "context" and "context" in batch.modalities[b])]
        assert (batch.audio_mask[b] == (batch.segment_ids[b] == SEGMENT_CODE["audio"])).all()
        # every audio position is attended (defect 1: the official mask hid it)
        assert (batch.attention_mask[b][batch.audio_mask[b]] == 1).all()
    alone = torch.cat([model(model.collate([it])) for it in items])
    torch.testing.assert_close(model(batch), alone, atol=2e-5, rtol=1e-4)


def test_audio_token_is_seen():
    """Changing only the audio embedding changes the logits (the audio key is not masked away)."""
    model = make_model("phi")
    a = model(model.collate([FusionItem(task="T4", audio=audio(1), context=CTX[1])]))
    b = model(model.collate([FusionItem(task="T4", audio=audio(9), context=CTX[1])]))
    assert not torch.allclose(a, b)


def test_pooled_index_is_last_real_token():
    model = make_model("qwen2", padding_side="right")
    batch = model.collate(mixed_items())
    m = batch.attention_mask
    expected = torch.tensor([int(torch.nonzero(row).max()) for row in m])
    assert torch.equal(batch.last_index, expected)
    assert (batch.last_index < m.shape[1] - 1).any()  # position -1 would have been a pad for some row
    hidden, _ = model._run(model.embed(batch), m, batch.position_ids)
    pooled = hidden[torch.arange(len(batch)), batch.last_index]
    torch.testing.assert_close(model(batch), model.head(pooled))
    left = make_model("qwen2", padding_side="left").collate(mixed_items())
    assert (left.last_index == left.attention_mask.shape[1] - 1).all()
    assert (left.position_ids[left.attention_mask == 1].min() == 0)


EXPECTED_TARGETS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "phi": {"q_proj", "k_proj", "v_proj", "dense"},
    "gpt2": {"attn.c_attn", "attn.c_proj"},
}
EXPECTED_MLP = {"llama": {"gate_proj", "up_proj", "down_proj"}, "qwen2": {"gate_proj", "up_proj", "down_proj"},
                "phi": {"fc1", "fc2"}, "gpt2": {"mlp.c_fc", "mlp.c_proj"}}


def _suffixes(names: list[str], arch: str) -> set[str]:
    keep = 2 if arch == "gpt2" else 1
    return {".".join(n.split(".")[-keep:]) for n in names}


@pytest.mark.parametrize("arch", ["llama", "phi", "qwen2", "gpt2"])
@pytest.mark.parametrize("mlp", [False, True])
def test_lora_targets_per_architecture(arch, mlp):
    model = make_model(arch, lora=LoraSettings(mlp=mlp))
    names = model.lora_modules()
    want = EXPECTED_TARGETS[arch] | (EXPECTED_MLP[arch] if mlp else set())
    assert _suffixes(names, arch) == want
    layers = model.backbone.num_layers
    assert len(names) == layers * len(want)  # every layer, nothing else (no LM head, no head)
    assert not any("lm_head" in n or "embed" in n for n in names)
    lora_params = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(lora_params) == 2 * len(names)
    r = model.cfg.lora.r
    assert all(p.shape[0] == r or p.shape[1] == r for n, p in model.named_parameters() if "lora_" in n)


def test_unknown_architecture_needs_explicit_targets():
    from respiramfm.models.lora import target_modules

    with pytest.raises(ConfigError, match="target_modules"):
        target_modules("mamba")
    assert target_modules("mistral") == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_only_lora_and_head_train():
    model = make_model("phi")
    model.train()
    assert not model.projector.training  # frozen aligner stays in eval (defect 6)
    assert all(not m.training for m in model.projector.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    items = [FusionItem(task="T4", audio=audio(i), context=CTX[i % 3], label=i % 2) for i in range(4)]
    for _ in range(3):
        batch = model.collate(items)
        loss = torch.nn.functional.cross_entropy(model(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable  # every LoRA matrix and the head moved; nothing else did
    assert not any(n.startswith("projector.") for n in changed)
    # projector dropout is off in train mode: the same audio projects identically twice
    x = torch.randn(3, 1, IN_DIM)
    torch.testing.assert_close(model.project_audio(x), model.project_audio(x))


def test_gradient_checkpointing_keeps_gradients():
    items = [FusionItem(task="T4", audio=audio(i), context=CTX[i % 3], label=i % 2) for i in range(3)]
    grads = []
    for checkpointing in (False, True):
        model = make_model("llama", lora=LoraSettings(dropout=0.0))
        if checkpointing:
            model.enable_gradient_checkpointing()
            assert model.inner_decoder().is_activation_checkpointing
        model.train()
        batch = model.collate(items)
        torch.nn.functional.cross_entropy(model(batch), batch.labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and all(g.abs().sum() > 0 for g in grads[1].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)


def test_a_backbone_serves_one_model():
    model = make_model("llama")
    with pytest.raises(ConfigError, match="already carries LoRA"):
        RespiraMFM(model.cfg, build_projector(ProjectorConfig(in_dim=IN_DIM, hidden=8, out_dim=64)), model.backbone)


def test_modes_and_missing_modalities():
    mm = make_model("llama")
    r = mm.resolve(FusionItem(task="T4", audio=audio(1), context=CTX[0], audio_type="lung"))
    assert r.modalities == ("audio", "context") and [k for k, _ in r.segments] == ["prompt", "context", "audio"]
    prompt = mm.tokenizer.decode(r.segments[0][1])
    assert "audio of the person's lung sounds" in prompt  # modality follows the recording (defect 5)
    r = mm.resolve(FusionItem(task="T4", audio=None, context=CTX[0]))
    assert r.modalities == ("context",)
    assert "audio" not in mm.tokenizer.decode(r.segments[0][1])  # text-only prompt (defect 8)
    r = mm.resolve(FusionItem(task="T4", audio=audio(1), context="   "))
    assert r.modalities == ("audio",)
    with pytest.raises(DataError, match="nothing to classify"):
        mm.resolve(FusionItem(task="T4", audio=None, context=""))

    ao = make_model("llama", mode="audio_only")
    r = ao.resolve(FusionItem(task="T4", audio=audio(1), context=CTX[0]))
    assert r.modalities == ("audio",) and [k for k, _ in r.segments] == ["prompt", "audio"]
    assert "given the following information and audio" in ao.tokenizer.decode(r.segments[0][1])
    with pytest.raises(DataError, match="audio_only"):
        ao.resolve(FusionItem(task="T4", audio=None, context=CTX[0]))

    to = make_model("llama", mode="text_only")
    r = to.resolve(FusionItem(task="T4", audio=audio(1), context=CTX[0]))
    assert r.modalities == ("context",) and [k for k, _ in r.segments] == ["prompt", "context"]
    text = to.tokenizer.decode(r.segments[0][1])
    assert "given the following information." in text and "sounds" not in text
    probs = to.predict_proba([FusionItem(task="T4", audio=audio(1), context=CTX[0]),
                              FusionItem(task="T4", audio=None, context=CTX[0])])
    assert probs[0] == pytest.approx(probs[1], abs=1e-6)  # audio truly ignored in text-only mode


def test_bad_items_are_typed_errors():
    model = make_model("llama")
    with pytest.raises(DataError, match="shape"):
        model.resolve(FusionItem(task="T4", audio=np.zeros(IN_DIM + 1, np.float32), context=CTX[0], key="r7"))
    with pytest.raises(DataError, match="NaN"):
        model.resolve(FusionItem(task="T4", audio=np.full(IN_DIM, np.nan, np.float32), context=CTX[0]))
    with pytest.raises(ConfigError, match="unknown task"):
        model.resolve(FusionItem(task="T99", audio=audio(1), context=CTX[0]))
    with pytest.raises(DataError, match="needs a task"):
        model.resolve(FusionItem(audio=audio(1), context=CTX[0]))


def test_context_truncated_not_padded():
    model = make_model("llama", max_context_tokens=7)
    r = model.resolve(FusionItem(task="T4", audio=audio(1), context=CTX[0]))
    ctx = dict(r.segments)["context"]
    assert len(ctx) == 7 and ctx == model.tokenize(CTX[0])[:7]
    r = model.resolve(FusionItem(task="T4", audio=audio(1), context="Age: 3."))
    assert len(dict(r.segments)["context"]) == len(model.tokenize("Age: 3.")) < 7


def test_multi_token_audio():
    model = make_model("llama", n_audio_tokens=8)
    items = mixed_items(n_tokens=8)
    batch = model.collate(items)
    assert batch.audio.shape == (3, 8, IN_DIM)
    assert batch.audio_mask.sum(1).tolist() == [8, 0, 8, 8]
    alone = torch.cat([model(model.collate([it])) for it in items])
    torch.testing.assert_close(model(batch), alone, atol=2e-5, rtol=1e-4)


def test_prefix_cache_gives_the_same_logits():
    model = make_model("llama")
    items = [FusionItem(task="T4", audio=audio(i), context=CTX[i % 3]) for i in range(3)]
    ids = model.prompt_ids("T4", with_audio=True)
    cache = model.prefix_cache(ids)
    batch = model.collate(items, prefix=ids)
    assert batch.prefix_len == len(ids) and int(batch.position_ids[0, 0]) == len(ids)
    cached = model(batch, past_key_values=model.expand_cache(cache, len(items)))
    torch.testing.assert_close(cached, model(model.collate(items)), atol=2e-5, rtol=1e-4)
    with pytest.raises(DataError, match="prefix"):  # a text-only item has a different prompt
        model.collate([FusionItem(task="T4", audio=None, context=CTX[0])], prefix=ids)


def test_attention_attribution_over_context_tokens():
    model = make_model("llama")
    item = FusionItem(task="T4", audio=audio(1), context=CTX[0])
    att = model.attention_attribution(item)
    ctx_ids = model.tokenize_context(CTX[0])
    assert len(att["tokens"]) == len(att["weights"]) == len(ctx_ids)
    assert "".join(att["tokens"]) == model.tokenizer.decode(ctx_ids)
    assert all(w >= 0 for w in att["weights"])
    assert sum(att["weights"]) == pytest.approx(att["context_mass"], rel=1e-9)
    # independent check: last-layer attention of the pooled token, heads averaged, over context positions
    inner = model.inner_decoder()
    inner.set_attn_implementation("eager")
    batch = model.collate([item])
    with torch.no_grad():
        out = model.llm(inputs_embeds=model.embed(batch), attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, output_attentions=True)
    inner.set_attn_implementation("sdpa")
    row = out.attentions[-1][0, :, int(batch.last_index[0])].mean(0)
    assert float(row.sum()) == pytest.approx(1.0, abs=1e-5)
    ctx_pos = batch.segment_ids[0] == SEGMENT_CODE["context"]
    assert att["context_mass"] == pytest.approx(float(row[ctx_pos].sum()), abs=1e-6)
    assert 0.0 < att["context_mass"] < 1.0
    # the model's forward still uses its original attention implementation afterwards
    assert inner.config._attn_implementation == "sdpa"


def test_audio_scale_puts_audio_on_the_embedding_scale():
    model = make_model("llama", audio_scale="embedding_rms")
    norms = model.project_audio(torch.randn(4, 1, IN_DIM)).norm(dim=-1)
    target = model.input_embeddings().weight.norm(dim=1).mean()
    torch.testing.assert_close(norms, torch.full_like(norms, float(target)), rtol=1e-4, atol=1e-4)


def test_config_validation():
    with pytest.raises(ConfigError, match="order"):
        FusionConfig(order=["prompt", "audio"]).validate()
    with pytest.raises(ConfigError, match="mode"):
        FusionConfig(mode="both").validate()
    with pytest.raises(ConfigError, match="hidden size"):
        RespiraMFM(FusionConfig(backbone="tiny-llama"),
                   build_projector(ProjectorConfig(in_dim=IN_DIM, hidden=8, out_dim=32)))
