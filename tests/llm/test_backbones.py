"""Backbone loading: the real offline SmolLM2, tiny models of each family, local folders, padding."""

from __future__ import annotations

import json

import pytest
import torch

from respiramfm.errors import ConfigError
from respiramfm.llm import smollm
from respiramfm.llm.backbones import TINY_ARCHS, load_backbone, prepare_tokenizer, state_digest, tiny_backbone


@pytest.mark.slow
def test_smollm2_offline_conversion_and_cached_reload(smollm2_pair, model_cache):
    first, second = smollm2_pair
    # The first load read the bundled GGUF; the second read the converted folder in the cache.
    assert first.source.endswith(smollm.GGUF_NAME)
    folder = smollm.cache_dir_for(smollm.gguf_sha256())
    assert second.source == str(folder) and folder.is_relative_to(model_cache)
    assert smollm.is_complete(folder) and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    for bb in (first, second):
        assert bb.arch == "llama"
        assert bb.hidden_size == 576 and bb.num_layers == 30
        assert bb.model.config.vocab_size == 49_152 and len(bb.tokenizer) == 49_152
        assert bb.n_params == 134_515_008
        assert bb.tokenizer.pad_token_id == bb.tokenizer.eos_token_id
        assert not any(p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    assert first.padding_side == "right"
    batch = first.tokenizer(["The capital of France is", "Patient presents with a dry cough and fever."],
                            return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, -1] == 0  # row 0 really is padded
    with torch.no_grad():
        a = first.model(**batch).logits
        b = second.model(**batch).logits
    assert a.shape == (2, batch["input_ids"].shape[1], 49_152) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    # A correctly dequantised model is a working language model, not just the right shape.
    last = int(batch["attention_mask"][0].sum()) - 1  # right padding: last real token of row 0
    assert first.tokenizer.decode([a[0, last].argmax().item()]).strip() == "Paris"
    assert second.identity()["weights"] == f"gguf-sha256:{smollm.gguf_sha256()}"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_backbone_forward(arch, tiny):
    bb = tiny(arch)
    assert bb.arch == arch and bb.hidden_size == 64 and bb.num_layers == 2
    assert bb.model.config.vocab_size == len(bb.tokenizer) == 49_152
    assert bb.n_params == sum(p.numel() for p in bb.model.parameters())
    enc = bb.tokenizer(["Patient presents with no obvious respiratory symptoms."], return_tensors="pt")
    with torch.no_grad():
        logits = bb.model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 49_152) and torch.isfinite(logits).all()


def test_tiny_init_is_seeded_and_leaves_global_rng_alone(tiny):
    state = torch.get_rng_state()
    a, b, c = tiny("llama", seed=3), tiny("llama", seed=3), tiny("llama", seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert state_digest(a.model) == state_digest(b.model) != state_digest(c.model)
    assert a.identity() == b.identity() and a.identity()["weights"] != c.identity()["weights"]


def test_phi2_shaped_tiny_config(tiny):
    bb = tiny("phi", hidden_size=80, heads=4)  # head_dim 20 -> rotary on int(20 * 0.4) = 8 dims
    cfg = bb.model.config
    assert cfg.model_type == "phi" and cfg.rope_parameters["partial_rotary_factor"] == 0.4
    assert cfg.hidden_act == "gelu_new" and not cfg.tie_word_embeddings
    names = {n.rsplit(".", 1)[-1] for n, _ in bb.model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"} <= names and "o_proj" not in names
    assert bb.model.model.layers[0].self_attn.rotary_ndims == 8
    assert bb.model.lm_head.weight.data_ptr() != bb.model.model.embed_tokens.weight.data_ptr()
    enc = bb.tokenizer(["Gender: male. Age: 3."], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(bb.model(**enc).logits).all()


def test_pad_falls_back_to_eos(tiny):
    tok = tiny("llama").tokenizer
    tok.pad_token = None
    assert tok.pad_token is None
    prepare_tokenizer(tok, "left")
    assert tok.pad_token == tok.eos_token and tok.padding_side == "left"
    tok.pad_token = None
    tok.eos_token = None
    with pytest.raises(ConfigError, match="neither a pad token nor an EOS"):
        prepare_tokenizer(tok)
    with pytest.raises(ConfigError, match="padding side"):
        prepare_tokenizer(tiny("llama").tokenizer, "middle")


@pytest.mark.parametrize("arch", ["phi", "gpt2"])
def test_load_backbone_from_local_folder(arch, tiny, tmp_path):
    src = tiny(arch, seed=1)
    src.model.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    bb = load_backbone(str(tmp_path / "m"), dtype="float32", padding_side="left")
    assert bb.arch == arch and bb.hidden_size == 64 and bb.padding_side == "left"
    assert bb.n_params == src.n_params and not bb.model.training
    assert bb.identity()["weights"] == src.identity()["weights"]  # same content, same identity
    enc = src.tokenizer(["Record location: trachea."], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(src.model(**enc).logits, bb.model(**enc).logits)
    half = load_backbone(str(tmp_path / "m"), dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.identity()["dtype"] == "bfloat16"


def test_load_backbone_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot load causal LM"):
        load_backbone("no-such-org/no-such-model-xyz")  # offline in tests: hub ids fail cleanly
    (tmp_path / "weights.bin").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a file"):
        load_backbone(str(tmp_path / "weights.bin"))
    with pytest.raises(ConfigError, match="cannot load causal LM"):
        load_backbone(str(tmp_path))  # a folder without a model
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_backbone("smollm2-135m", dtype="float8")
    with pytest.raises(ConfigError, match="unknown tiny architecture"):
        tiny_backbone("mamba")
    with pytest.raises(ConfigError, match="no field"):
        tiny_backbone("llama", not_a_field=1)


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_keep_first_layers_equals_the_first_layers_of_the_full_model(arch, tiny):
    """A cut backbone computes exactly the full model's first N layers, then its final norm."""
    full, cut = tiny(arch, num_layers=3, seed=5), tiny(arch, num_layers=3, seed=5)
    ident = full.identity()
    assert cut.keep_first_layers(2) is cut
    assert cut.num_layers == 2 and cut.truncated_from == 3 and len(cut.decoder().layers) == 2
    assert cut.model.config.num_hidden_layers == 2
    assert cut.n_params == sum(p.numel() for p in cut.model.parameters()) < full.n_params
    enc = full.tokenizer(["Patient presents with wheezing.", "Smoker."], return_tensors="pt", padding=True)
    with torch.no_grad():
        hs = full.decoder()(**enc, output_hidden_states=True).hidden_states
        want = full.decoder().final_layernorm(hs[2]) if arch == "phi" else full.decoder().norm(hs[2])
        got = cut.decoder()(**enc).last_hidden_state
        last_full = full.decoder()(**enc).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, last_full, atol=1e-3)  # the third layer really is gone
    # The identity records the cut (text targets and saved models of other depths never match).
    assert cut.identity()["layers"] == "first 2 of 3" and "layers" not in ident
    assert cut.identity() != ident and cut.identity()["tokenizer"] == ident["tokenizer"]
    assert cut.keep_first_layers(2).num_layers == 2  # keeping every remaining layer is a no-op
    for bad in (0, 3, -1):
        with pytest.raises(ConfigError, match="num_layers must lie in"):
            cut.keep_first_layers(bad)
