"""OPERA-CT parity with the public code (fixtures), strict loading, weight identity, frozen semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from respiramfm.models.htsat import HTSAT
from respiramfm.models.opera_ct import HTSAT_PREFIX, OperaCT, from_checkpoint, seeded_state_dict
from respiramfm.errors import CheckpointError

TOL = 1e-4
TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def full_state(opera_fixtures) -> dict:
    return seeded_state_dict(opera_fixtures / "opera_ct_state_dict.tsv", seed=0)


@pytest.fixture(scope="module")
def full_model(full_state) -> OperaCT:
    return from_checkpoint(full_state)


@pytest.fixture(scope="module")
def tiny_model(opera_fixtures) -> OperaCT:
    return from_checkpoint(opera_fixtures / "opera_ct_tiny_seed0.safetensors")


def _max_diff(model: OperaCT, npz, t: int) -> float:
    out = model(torch.from_numpy(npz[f"spec_T{t}"])[None])[0].numpy()
    return float(np.abs(out - npz[f"out_T{t}"]).max())


@pytest.mark.parametrize("fused", [True, False])
def test_tiny_checkpoint_parity(opera_fixtures, tiny_model, fused):
    npz = np.load(opera_fixtures / "opera_ct_tiny_seed0.npz")
    tiny_model.htsat.fused = fused
    try:
        diffs = {t: _max_diff(tiny_model, npz, t) for t in (63, 251, 1600)}
    finally:
        tiny_model.htsat.fused = True
    print("tiny max abs diff", fused, diffs)
    assert max(diffs.values()) < TOL, diffs


def test_full_size_seed0_parity(opera_fixtures, full_model):
    npz = np.load(opera_fixtures / "opera_ct_full_seed0.npz")
    diffs = {t: _max_diff(full_model, npz, t) for t in (63, 251, 1600)}
    full_model.htsat.fused = False
    try:
        diffs["T251_reference_path"] = _max_diff(full_model, npz, 251)
    finally:
        full_model.htsat.fused = True
    print("full max abs diff", diffs)
    assert max(diffs.values()) < TOL, diffs


def test_seed_rule_reproduces_tiny_checkpoint(opera_fixtures):
    released = load_file(str(opera_fixtures / "opera_ct_tiny_seed0.safetensors"))
    shapes = {HTSAT_PREFIX + k: v for k, v in HTSAT(**TINY).state_dict().items()}
    ours = seeded_state_dict(shapes, seed=0)
    assert sorted(ours) == sorted(released)
    assert all(torch.equal(ours[k], released[k]) for k in released)
    assert not torch.equal(seeded_state_dict(shapes, seed=1)[HTSAT_PREFIX + "head.bias"],
                           released[HTSAT_PREFIX + "head.bias"])


def test_manifest_loads_strictly_and_sizes_are_inferred(full_state, full_model):
    assert len(full_state) == 200 and all(k.startswith(HTSAT_PREFIX) for k in full_state)
    assert full_state[HTSAT_PREFIX + "bn0.num_batches_tracked"].dtype == torch.int64
    m = full_model.htsat
    assert (m.embed_dim, m.depths, m.num_heads, m.num_classes) == (96, (2, 2, 6, 2), (4, 8, 16, 32), 527)
    assert full_model.embed_dim == 96 and full_model.out_dim == 768 and len(full_model.weights_sha256) == 64


def _fails_with(state, *fragments, **kw):
    with pytest.raises(CheckpointError) as err:
        from_checkpoint(state, **kw)
    for f in fragments:
        assert f in str(err.value), str(err.value)


def test_missing_extra_misshaped_keys_are_listed(opera_fixtures):
    state = load_file(str(opera_fixtures / "opera_ct_tiny_seed0.safetensors"))
    p = HTSAT_PREFIX
    _fails_with({k: v for k, v in state.items() if k != p + "layers.2.blocks.1.mlp.fc2.bias"},
                "missing keys", "layers.2.blocks.1.mlp.fc2.bias")
    _fails_with({k: v for k, v in state.items() if k != p + "layers.2.blocks.1.attn_mask"},
                "missing keys", "layers.2.blocks.1.attn_mask")
    _fails_with({**state, p + "layers.0.blocks.0.extra.weight": torch.zeros(3)},
                "unexpected keys", "layers.0.blocks.0.extra.weight")
    _fails_with({**state, p + "norm.bias": torch.zeros(7)}, "mis-shaped", "norm.bias")
    _fails_with({**state, "optimizer.weird": torch.zeros(1)}, "outside", "optimizer.weird")
    idx = p + "layers.1.blocks.0.attn.relative_position_index"
    _fails_with({**state, idx: torch.zeros_like(state[idx])}, "architecture buffers", idx[len(p):])
    _fails_with(state, "embed_dim=32 given", "patch_embed.proj.weight", embed_dim=32)
    _fails_with(state, "depths=(2, 2, 6, 2) given", depths=(2, 2, 6, 2))
    _fails_with({k: v for k, v in state.items() if "patch_embed" not in k}, "patch_embed.proj.weight")


def test_front_end_and_cola_head_are_dropped(opera_fixtures, tiny_model):
    state = load_file(str(opera_fixtures / "opera_ct_tiny_seed0.safetensors"))
    state.update({HTSAT_PREFIX + "logmel_extractor.melW": torch.zeros(513, 64),
                  HTSAT_PREFIX + "spectrogram_extractor.stft.conv_real.weight": torch.zeros(513, 1, 1024),
                  "g.weight": torch.zeros(512, 128), "layer_norm.bias": torch.zeros(512),
                  "encoder.g.bias": torch.zeros(512), "linear.weight": torch.zeros(512, 512)})
    assert from_checkpoint(state).weights_sha256 == tiny_model.weights_sha256


def test_weights_hash_is_format_independent(opera_fixtures, tiny_model, tmp_path):
    state = load_file(str(opera_fixtures / "opera_ct_tiny_seed0.safetensors"))
    bare = {k[len(HTSAT_PREFIX):]: v for k, v in state.items()}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "lightning.ckpt")
    torch.save(bare, tmp_path / "plain.pt")
    hashes = {from_checkpoint(tmp_path / n).weights_sha256 for n in ("bare.safetensors", "lightning.ckpt", "plain.pt")}
    assert hashes == {tiny_model.weights_sha256}
    changed = dict(bare)
    changed["head.bias"] = changed["head.bias"] + 1e-3  # even an unused tensor changes the identity
    assert from_checkpoint(changed).weights_sha256 != tiny_model.weights_sha256


def test_always_frozen_eval(tiny_model):
    m = tiny_model
    assert m.train() is m and not m.training and not m.htsat.training
    assert not any(p.requires_grad for p in m.parameters())
    x = torch.rand(2, 1100, 64)
    assert torch.equal(m(x), m(x))  # no random crop, no drop-path
    emb = m(x)
    head = torch.nn.Linear(128, 1)
    head(emb).sum().backward()  # output is an ordinary tensor usable in a trained head
    assert head.weight.grad is not None


@pytest.mark.parametrize("t", [1025, 1030])
def test_full_size_runs_just_past_the_window(full_model, t):
    x = torch.rand(1, t, 64, generator=torch.Generator().manual_seed(t))
    out = full_model(x)
    assert out.shape == (1, 768) and torch.isfinite(out).all()
    assert (out - full_model(x[:, :1024])).abs().max() < 1e-5  # only the window at 0 fits


def test_tokens_grid(tiny_model):
    x = torch.rand(2, 251, 64)
    tok = tiny_model.forward_tokens(x)
    assert tok.shape == (2, 64, 128)
    assert (tok.mean(1) - tiny_model(x)).abs().max() < 1e-5


def test_device_argument_and_missing_file(tmp_path, opera_fixtures):
    m = from_checkpoint(opera_fixtures / "opera_ct_tiny_seed0.safetensors", device="cpu")
    assert m.device.type == "cpu"
    with pytest.raises(CheckpointError, match="not found"):
        from_checkpoint(tmp_path / "absent.safetensors")
