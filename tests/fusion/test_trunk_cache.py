"""Frozen-trunk cache: cached logits and LoRA gradients equal the uncached ones; store reuse and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from respiramfm.errors import CheckpointError, ConfigError
from respiramfm.fusion.infer import items_to_resolved, plain_logits, predict_logits, shared_prefix_logits
from respiramfm.fusion.trunk_cache import TrunkCache, TrunkStore, item_key, lora_cut, trunk_states
from respiramfm.models.configuration import FusionConfig, LoraSettings, ProjectorConfig
from respiramfm.models.fusion import RespiraMFM
from respiramfm.models.projector import build_projector
from respiramfm.models.sequence import FusionItem

CONTEXTS = ["Gender: male. Age: 70. Record location: trachea. Smoking status: smoker.",
            "Patient presents with the following respiratory symptoms: fever, cough, fatigue.", "", "wheezing"]


def _model(arch="llama", layers=6, top=2, dropout=0.1, hidden=64, seed=0, backbone=None, **tiny):
    torch.manual_seed(seed)
    proj = build_projector(ProjectorConfig(in_dim=16, hidden=32, out_dim=hidden, final="layernorm"))
    cfg = FusionConfig(backbone=f"tiny-{arch}" if backbone is None else "smollm2-135m",
                       tiny={"num_layers": layers, "hidden_size": hidden, "seed": seed, **tiny},
                       lora=LoraSettings(top_layers=top, dropout=dropout))
    model = RespiraMFM(cfg, proj, backbone=backbone)
    with torch.no_grad():  # LoRA B starts at zero; give the adapters something to do
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model


def _items(n=6, seed=0):
    rng = np.random.default_rng(seed)
    tasks = ["T4", "T1", "T9", "T5"]
    return [FusionItem(task=tasks[i % 4], audio=None if i % 4 == 1 else rng.standard_normal(16).astype(np.float32),
                       audio_type="lung", context=CONTEXTS[i % 4], label=i % 2) for i in range(n)]


def _records(cache) -> int:
    return sum(not k.startswith("prompt:") for k in cache.store.index)


def _loss_and_grads(model, fn, resolved):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same LoRA-dropout masks in the adapted layers on both paths
    logits = fn(resolved)
    labels = torch.tensor([r.label for r in resolved])
    torch.nn.functional.cross_entropy(logits, labels).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def _assert_same(model, cache, resolved, atol=1e-5, shared=True):
    """Cached vs uncached training forward: the shared-prompt path (training's) or every item padded in full."""
    reference = shared_prefix_logits if shared else plain_logits
    ref_logits, ref_grads = _loss_and_grads(model, lambda r: reference(model, r), resolved)
    got_logits, got_grads = _loss_and_grads(model, lambda r: cache.logits(r, shared_prompt=shared), resolved)
    torch.testing.assert_close(got_logits, ref_logits, atol=atol, rtol=0)
    assert sorted(got_grads) == sorted(ref_grads) and any("lora_A" in k for k in got_grads)
    for name in ref_grads:
        assert ref_grads[name].abs().max() > 0, name  # every LoRA matrix and the head really learn
        torch.testing.assert_close(got_grads[name], ref_grads[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_tiny_cached_logits_and_gradients_equal_uncached(tmp_path, one_thread, padding_side):
    model = _model()
    model.cfg.padding_side = padding_side
    assert {n.split(".")[1] for n in model.lora_modules()} == {"4", "5"}  # placement: top 2 of 6
    assert lora_cut(model) == 4
    resolved = items_to_resolved(model, _items())
    cache = TrunkCache(model, tmp_path)
    model.train()
    _assert_same(model, cache, resolved, shared=False)
    _assert_same(model, cache, resolved, shared=True)
    distinct = len({item_key(r) for r in resolved})
    assert distinct == 5  # items 1 and 5 are the same text-only record: stored once
    assert cache.computed == distinct and _records(cache) == distinct
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(cache.logits(resolved), plain_logits(model, resolved), atol=1e-5, rtol=0)
    model.train()
    torch.testing.assert_close(cache.predict_logits(resolved, batch_size=4), predict_logits(model, resolved),
                               atol=1e-5, rtol=0)  # validation's path, in eval mode
    assert model.training


def test_store_is_reused_resumable_and_keyed_by_content(tmp_path, one_thread):
    model = _model()
    resolved = items_to_resolved(model, _items())
    first = TrunkCache(model, tmp_path)
    assert first.build(resolved[:4], batch_size=3) == 4
    # A build killed between writing states and publishing the index leaves a torn tail: cut off on open.
    with open(first.store.data_path, "ab") as fh:
        fh.write(b"\x00" * 1000)
    again = TrunkCache(model, tmp_path)  # another seed / epoch / system: same folder, same records
    assert again.store.dir == first.store.dir and _records(again) == 4
    assert again.store.data_path.stat().st_size == again.store.nbytes
    assert again.build(resolved) == 1  # resumes: item 4 is new, item 5 repeats the stored item 1
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.logits(resolved), plain_logits(model, resolved), atol=1e-5, rtol=0)
    assert again.computed == 1
    # Inputs change -> other keys; the model changes -> another folder.
    changed = items_to_resolved(model, _items(seed=1))
    assert item_key(changed[0]) != item_key(resolved[0]) and item_key(changed[1]) == item_key(resolved[1])
    other = TrunkCache(_model(seed=1), tmp_path)
    assert other.store.dir != first.store.dir and _records(other) == 0
    deeper = _model(top=3)
    assert TrunkCache(deeper, tmp_path).store.dir not in (first.store.dir, other.store.dir)  # the cut is keyed


def test_trunk_precision_is_keyed_and_never_taken_from_the_caller(tmp_path, one_thread):
    """The trunk runs in the cache's own precision (training's), not in whatever autocast the caller is in
    (validation builds its records inside bf16 autocast), and fp32 and bf16 states live in different folders."""
    model = _model()
    resolved = items_to_resolved(model, _items(4))
    fp32, bf16 = TrunkCache(model, tmp_path), TrunkCache(model, tmp_path, precision="bf16")
    assert fp32.store.dir != bf16.store.dir
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32.build(resolved)
    bf16.build(resolved)
    key = item_key(resolved[0])
    reference = trunk_states(model, resolved[:1], fp32.cut)[0]
    torch.testing.assert_close(fp32.store.get(key), reference, atol=1e-6, rtol=0)
    assert (bf16.store.get(key) - reference).abs().max() > 1e-4  # really computed in bfloat16
    with pytest.raises(ConfigError, match="precision"):
        TrunkCache(model, tmp_path, precision="fp16")


def test_store_refuses_a_folder_of_another_model(tmp_path):
    TrunkStore(tmp_path, {"a": 1}, 8, torch.float32)
    with pytest.raises(CheckpointError, match="another model"):
        TrunkStore(tmp_path, {"a": 2}, 8, torch.float32)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index"):
        TrunkStore(tmp_path, {"a": 1}, 8, torch.float32)


def test_refuses_settings_where_the_cache_would_be_wrong(tmp_path, one_thread):
    with pytest.raises(ConfigError, match="every one of the 6 layers"):
        TrunkCache(_model(top=0), tmp_path)
    model = _model()
    model.projector.requires_grad_(True)
    with pytest.raises(ConfigError, match="projector is trainable"):
        TrunkCache(model, tmp_path)
    model = _model()
    model.inner_decoder().layers[1].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="below the cut"):
        TrunkCache(model, tmp_path)
    # Phi's residual dropout (0.1) runs below the cut in training mode.
    phi = _model("phi", layers=4, top=1)
    resolved = items_to_resolved(phi, _items(2))
    cache = TrunkCache(phi, tmp_path)
    phi.train()
    with pytest.raises(ConfigError, match="dropout below layer 3"):
        cache.logits(resolved)
    accepted = TrunkCache(phi, tmp_path, accept_eval_trunk=True)
    assert accepted.logits(resolved).shape == (2, 2)
    phi.eval()
    with torch.no_grad():
        torch.testing.assert_close(cache.logits(resolved), plain_logits(phi, resolved), atol=1e-5, rtol=0)


def test_placement_survives_save_and_load(tmp_path, one_thread):
    model = _model(top=2)
    loaded = RespiraMFM.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.cfg.lora.top_layers == 2 and loaded.lora_modules() == model.lora_modules()
    items = _items(3)
    np.testing.assert_allclose(loaded.predict_proba(items), model.predict_proba(items), atol=1e-6)
    with pytest.raises(ConfigError, match="top_layers"):
        LoraSettings(top_layers=-1).validate()


@pytest.mark.slow
def test_smollm2_full_depth_cached_equals_uncached(tmp_path, smollm2, one_thread):
    from respiramfm.llm.backbones import load_backbone

    model = _model(backbone=load_backbone("smollm2-135m"), top=4, hidden=576)  # a fresh copy: LoRA edits it
    assert model.backbone.num_layers == 30 and lora_cut(model) == 26
    assert len(model.lora_modules()) == 4 * 4
    resolved = items_to_resolved(model, _items(3))
    cache = TrunkCache(model, tmp_path)
    model.train()
    _assert_same(model, cache, resolved, shared=True)
    _assert_same(model, cache, resolved, shared=False)


def test_finetune_with_the_trunk_cache_trains_the_same_weights(tmp_path):
    from safetensors.torch import load_file
    from testkit.finetune_synth import make_synth

    from respiramfm.config import load_config
    from respiramfm.fusion.train import FinetuneConfig, finetune

    synth = make_synth(tmp_path / "data")
    common = {"model.tiny": "{hidden_size: 64, num_layers: 3, heads: 4}", "model.lora.top_layers": 1,
              "model.lora.dropout": 0.1, "epochs": 1, "max_steps": 4, "eval_every": 2}
    runs = {}
    for name, extra in (("plain", {}), ("cached", {"trunk_cache": "true", "trunk_cache_dir": str(tmp_path / "tc")})):
        finetune(load_config(FinetuneConfig, None, synth.sets(out_dir=tmp_path / name, **common, **extra)))
        latest = json.loads((tmp_path / name / "checkpoints" / "latest.json").read_text())["dir"]
        runs[name] = load_file(str(tmp_path / name / "checkpoints" / latest / "model.safetensors"))
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name + "_val"] = [r["val_loss"] for r in rows if r.get("kind") == "eval"]
    assert len(runs["plain_val"]) >= 2  # validation ran (through the cache in the cached run)
    np.testing.assert_allclose(runs["cached_val"], runs["plain_val"], atol=1e-5)
    assert any((tmp_path / "tc").rglob("states.bin"))
    moved = [k for k in runs["plain"] if k.startswith("cur::") and "lora_B" in k]
    assert moved and all(".layers.2." in k for k in moved)  # placement: only the top layer is adapted
    assert all(runs["plain"][k].abs().max() > 0 for k in moved)
    for k in runs["plain"]:
        torch.testing.assert_close(runs["cached"][k], runs["plain"][k], atol=1e-5, rtol=1e-4, msg=k)
