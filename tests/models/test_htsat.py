"""HTS-AT architecture facts: key names, parameter counts, window/shift geometry, token order, modes."""

from __future__ import annotations

import pytest
import torch

from respiramfm.models.htsat import HTSAT, relative_position_index, shift_mask, window_order
from respiramfm.errors import ConfigError, DataError

PREFIX = "encoder.encoder.htsat."
TINY = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


def tiny(seed: int = 0, **kw) -> HTSAT:
    torch.manual_seed(seed)
    m = HTSAT(**{**TINY, **kw})
    with torch.no_grad():  # non-trivial norms / biases so that every parameter matters
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
        m.bn0.running_mean.uniform_(0.2, 0.4)
        m.bn0.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture(scope="module")
def full() -> HTSAT:
    return HTSAT()


def test_state_dict_matches_released_manifest(opera_fixtures, full):
    rows = [line.split("\t") for line in (opera_fixtures / "opera_ct_state_dict.tsv").read_text().splitlines()[1:]]
    manifest = {k[len(PREFIX):]: s for k, s, _ in rows}
    assert len(manifest) == 200
    ours = {k: "x".join(map(str, v.shape)) or "scalar" for k, v in full.state_dict().items()}
    extractor = {k for k in manifest if k.startswith(("spectrogram_extractor.", "logmel_extractor."))}
    assert len(extractor) == 3
    assert {k: manifest[k] for k in manifest if k not in extractor} == ours
    shifted = sorted(k for k in ours if k.endswith("attn_mask"))
    assert shifted == [f"layers.{i}.blocks.{j}.attn_mask" for i, j in ((0, 1), (1, 1), (2, 1), (2, 3), (2, 5))]


def test_parameter_counts(full):
    m = full
    total = sum(p.numel() for p in m.parameters())
    backbone = total - sum(p.numel() for n, p in m.named_parameters() if n.startswith(("tscam_conv", "head")))
    assert total == 30_241_687 and backbone == 27_534_488
    assert total + 1_083_456 == 31_325_143  # published count includes the unused front-end weights
    assert m.num_features == 768 and [s.blocks[0].window_size for s in m.layers] == [8, 8, 8, 8]
    assert [b.shift_size for b in m.layers[3].blocks] == [0, 0]  # 8x8 grid = one window: no shift


def test_relative_position_index_formula():
    idx = relative_position_index(8)
    n = torch.arange(64)
    dh = n[:, None] // 8 - n[None, :] // 8
    dw = n[:, None] % 8 - n[None, :] % 8
    assert torch.equal(idx, (dh + 7) * 15 + (dw + 7))
    assert idx.min() == 0 and idx.max() == 224


def _roll_partition(h, w, ws, s):
    grid = torch.arange(h * w).view(1, h, w, 1)
    if s:
        grid = torch.roll(grid, shifts=(-s, -s), dims=(1, 2))
    return grid.view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3).reshape(-1)


@pytest.mark.parametrize("h,ws,s", [(64, 8, 0), (64, 8, 4), (16, 8, 4), (12, 4, 2)])
def test_window_order_equals_roll_then_partition(h, ws, s):
    assert torch.equal(window_order(h, h, ws, s), _roll_partition(h, h, ws, s))


def test_shift_mask_separates_wrapped_regions():
    h, ws, s = 16, 8, 4
    mask = shift_mask(h, h, ws, s)
    assert mask.shape == (4, 64, 64) and set(mask.unique().tolist()) == {0.0, -100.0}
    order = window_order(h, h, ws, s)
    rows, cols = order // h, order % h
    # two tokens of a window may attend iff they lie in the same region of the rolled image
    shifted_r = (rows - s) % h  # row in the rolled image
    shifted_c = (cols - s) % h
    lab_r = torch.where(shifted_r < h - ws, 0, torch.where(shifted_r < h - s, 1, 2))
    lab_c = torch.where(shifted_c < h - ws, 0, torch.where(shifted_c < h - s, 1, 2))
    lab = (lab_r * 3 + lab_c).view(4, 64)
    assert torch.equal(mask == 0, lab[:, :, None] == lab[:, None, :])
    assert (mask[0] == 0).all()  # the interior window sees no wrapped tokens


def test_fused_path_equals_reference_path():
    m = tiny()
    x = torch.rand(3, 300, 64)
    with torch.no_grad():
        fused = m(x), m.forward_tokens(x)
        m.fused = False
        ref = m(x), m.forward_tokens(x)
    assert (fused[0] - ref[0]).abs().max() < 1e-5
    assert (fused[1] - ref[1]).abs().max() < 1e-5
    assert torch.allclose(fused[1].mean(1), fused[0], atol=1e-6)


def test_fused_path_without_onednn(monkeypatch):
    from respiramfm.models import htsat_layers

    m = tiny()
    x = torch.rand(2, 251, 64)
    with torch.no_grad():
        fast = m(x)
        monkeypatch.setattr(htsat_layers, "_ONEDNN", False)  # torch builds without oneDNN: plain F.linear
        plain = m(x)
        m.fused = False
        ref = m(x)
    assert (fast - plain).abs().max() < 1e-5 and (plain - ref).abs().max() < 1e-5


def test_window_starts_fix_off_by_one():
    m = HTSAT(**TINY)
    assert m.window_starts(251) == [0] and m.window_starts(1024) == [0]
    assert m.window_starts(1025) == [0] and m.window_starts(1030) == [0]
    assert m.window_starts(1536) == [0, 512]  # OPERA's loop would skip the window at 512 here
    assert m.window_starts(1600) == [0, 512]  # what the T=1600 fixture was computed with
    assert m.window_starts(2049) == [0, 512, 1024]


@pytest.mark.parametrize("t", [1025, 1030, 1537])
def test_long_input_uses_full_windows(t):
    m = tiny()
    x = torch.rand(2, t, 64)
    with torch.no_grad():
        out = m(x)
        expect = torch.stack([m(x[:, s : s + 1024]) for s in m.window_starts(t)]).mean(0)
    assert out.shape == (2, 128) and torch.isfinite(out).all()
    assert (out - expect).abs().max() < 1e-5


def test_short_inputs_resize_and_fold():
    m = tiny()
    with torch.no_grad():
        for t in (1, 2, 63, 1024):
            assert m(torch.rand(1, t, 64)).shape == (1, 128)
    x = torch.arange(1024 * 64, dtype=torch.float32).view(1, 1024, 64)
    img = m.fold(x)[0, 0]  # no resize at T = 1024: row = 64 * chunk + mel, column = frame in chunk
    for chunk, mel, frame in ((0, 0, 0), (1, 5, 7), (3, 63, 255), (2, 31, 128)):
        assert img[64 * chunk + mel, frame] == x[0, 256 * chunk + frame, mel]


def test_token_order_follows_image_regions():
    """With identity residual branches, token 8i+j depends only on chunk i//2, mel half i%2, frames 32j..+31."""
    m = tiny()
    with torch.no_grad():
        for blk in (b for s in m.layers for b in s.blocks):
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        x = torch.rand(1, 1024, 64)
        base = m.forward_tokens(x)[0]
        chunk, half, col = 2, 1, 5
        y = x.clone()
        frames = 256 * chunk + 32 * col
        y[0, frames : frames + 32, 32 * half : 32 * half + 32] += 1.0
        changed = (m.forward_tokens(y)[0] - base).abs().amax(-1) > 1e-6
    assert changed.nonzero().flatten().tolist() == [8 * (2 * chunk + half) + col]


def test_train_mode_random_crop_and_drop_path():
    m = tiny(drop_path_rate=0.5)
    x = torch.rand(2, 1100, 64)
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.allclose(a, b)  # random crop and drop-path differ between draws
    loss = m(torch.rand(2, 251, 64)).pow(2).sum()
    loss.backward()  # the fused path is differentiable (used by pretraining)
    assert m.layers[2].blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))


def test_bias_cache_follows_weight_updates():
    m = tiny()
    x = torch.rand(1, 251, 64)
    with torch.no_grad():
        before = m(x)
        m.layers[2].blocks[1].attn.relative_position_bias_table.add_(torch.randn(225, 4))
        after = m(x)
        m.fused = False
        ref = m(x)
    assert not torch.allclose(before, after) and (after - ref).abs().max() < 1e-5


def test_bad_inputs_are_typed_errors():
    m = tiny()
    with pytest.raises(DataError):
        m(torch.rand(251, 64))
    with pytest.raises(DataError):
        m(torch.rand(1, 251, 32))
    with pytest.raises(DataError):
        m(torch.full((1, 251, 64), float("nan")))
    with pytest.raises(DataError):
        m(torch.ones(1, 251, 64, dtype=torch.long))
    with pytest.raises(ConfigError):
        HTSAT(embed_dim=10, num_heads=(3, 3, 3, 3))
    with pytest.raises(ConfigError):
        HTSAT(**TINY, window_size=7)  # a 64 x 64 grid cannot be tiled by 7 x 7 windows
