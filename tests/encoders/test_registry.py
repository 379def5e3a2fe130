"""Encoder registry: the built-in entries, lookups and errors, and the OPERA-CT adapter on the tiny fixture."""

from __future__ import annotations

import numpy as np
import pytest

from respiramfm.audio import FrontendConfig
from respiramfm.encoders.registry import (EncoderSpec, build_encoder, get_encoder, list_encoders,
                                          register_encoder)
from respiramfm.errors import ConfigError


def test_builtin_entries_and_their_front_end():
    assert {"opera-ct", "logmel-stats"} <= set(list_encoders())
    assert list_encoders() == sorted(list_encoders())
    for name in ("opera-ct", "logmel-stats"):
        spec = get_encoder(name)
        assert spec.name == name and spec.description
        # both run on the OPERA-CT front end exactly as RespiraMFM configures it
        assert spec.frontend == FrontendConfig(sr=16000, input_sec=8.0, crop="whole", n_mels=64)
    assert get_encoder("opera-ct").needs_checkpoint and get_encoder("opera-ct").supports_tokens
    assert get_encoder("opera-ct").out_dim is None  # depends on the checkpoint
    assert get_encoder("logmel-stats").out_dim == 384 and not get_encoder("logmel-stats").needs_checkpoint


def test_lookup_and_registration_errors():
    with pytest.raises(ConfigError, match="unknown encoder 'nope'.*logmel-stats"):
        get_encoder("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_encoder(get_encoder("logmel-stats"))
    with pytest.raises(TypeError):
        register_encoder({"name": "x"})
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        build_encoder("opera-ct")
    with pytest.raises(ConfigError, match="takes no checkpoint"):
        build_encoder("logmel-stats", checkpoint="weights.ckpt")


def test_register_a_new_encoder(monkeypatch):
    from respiramfm.encoders import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    base = get_encoder("logmel-stats")
    spec = EncoderSpec(name="logmel-stats-32", builder=lambda ckpt, device: base.build(),
                       out_dim=384, frontend=base.frontend.replace(input_sec=2.0), description="test entry")
    register_encoder(spec)
    assert "logmel-stats-32" in list_encoders() and get_encoder("logmel-stats-32") is spec
    register_encoder(spec, overwrite=True)
    enc = build_encoder("logmel-stats-32")
    assert enc.name == "logmel-stats" and enc.out_dim == 384 and len(enc.weights_hash) == 64


def test_opera_ct_adapter_matches_the_fixture_and_groups_lengths(opera_fixtures):
    enc = build_encoder("opera-ct", checkpoint=str(opera_fixtures / "opera_ct_tiny_seed0.safetensors"))
    ref = np.load(opera_fixtures / "opera_ct_tiny_seed0.npz")
    assert enc.name == "opera-ct" and enc.out_dim == 128 and len(enc.weights_hash) == 64
    specs = [ref["spec_T251"], ref["spec_T63"], ref["spec_T251"][::-1].copy(), ref["spec_T63"]]
    out = enc.encode(specs)  # two lengths, interleaved: grouped internally, returned in input order
    assert out.shape == (4, 128) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], ref["out_T251"], atol=1e-4)
    np.testing.assert_allclose(out[1], ref["out_T63"], atol=1e-4)
    np.testing.assert_array_equal(out[1], out[3])
    assert not np.allclose(out[0], out[2])
    enc.max_batch = 1  # one clip per forward pass: same numbers to float tolerance
    np.testing.assert_allclose(enc.encode(specs), out, atol=1e-5)

    tokens = enc.encode_tokens(specs[:2])
    assert tokens.shape == (2, 64, 128)
    np.testing.assert_allclose(tokens.mean(axis=1), out[:2], atol=1e-4)  # latent = mean of the 64 tokens
