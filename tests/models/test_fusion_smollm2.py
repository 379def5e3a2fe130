"""End to end on the real offline LLM (SmolLM2-135M-Instruct): batching, LoRA, save and reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from respiramfm.models.configuration import FusionConfig, ProjectorConfig
from respiramfm.models.projector import build_projector
from respiramfm.models.fusion import RespiraMFM
from respiramfm.models.saved import read_config
from respiramfm.models.sequence import FusionItem


@pytest.mark.slow
def test_smollm2_fusion_round_trip(tmp_path, smollm2):
    pytest.importorskip("gguf")
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(in_dim=16, hidden=32, out_dim=576, final="layernorm"))
    model = RespiraMFM(FusionConfig(backbone="smollm2-135m"), proj)
    assert model.backbone.arch == "llama" and model.hidden_size == 576
    assert len(model.lora_modules()) == 30 * 4
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    rng = np.random.default_rng(0)
    items = [FusionItem(task="T4", audio=rng.standard_normal(16).astype(np.float32), audio_type="lung",
                        context="Gender: male. Age: 70. Record location: trachea. Smoking status: smoker."),
             FusionItem(task="T1", audio=None, context="Patient presents with the following respiratory "
                                                       "symptoms: fever, cough, fatigue."),
             FusionItem(task="T9", audio=rng.standard_normal(16).astype(np.float32), context="")]
    batch = model.collate(items)
    together = model(batch)
    alone = torch.cat([model(model.collate([it])) for it in items])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    ids = model.prompt_ids("T4", "lung", with_audio=True)
    cached = model(model.collate(items[:1], prefix=ids), past_key_values=model.expand_cache(model.prefix_cache(ids), 1))
    torch.testing.assert_close(cached, alone[:1], atol=1e-4, rtol=1e-4)

    d = model.save_pretrained(tmp_path / "model")
    info = read_config(d)
    assert info["backbone"]["name"] == "smollm2-135m" and info["backbone"]["weights"].startswith("gguf-sha256:")
    assert not list(d.rglob("model.safetensors"))  # the base LLM is referenced, not copied
    loaded = RespiraMFM.from_pretrained(d)
    np.testing.assert_array_equal(loaded.predict_proba(items), model.predict_proba(items))
    att = loaded.attention_attribution(items[1])
    assert any("fever" in t for t in att["tokens"])
    assert sum(att["weights"]) == pytest.approx(att["context_mass"], rel=1e-9)
