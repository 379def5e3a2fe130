"""Unit tests of the COLA pretraining pieces: loss, head, augmentation chain, batch order.

The checkpoint I/O they used to test is the shared engine's: tests/training/test_checkpoint.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from respiramfm.encoders.pretrain_data import (
    Recording,
    SpectrogramStore,
    TwoCropDataset,
    epoch_batches,
    frame_mask,
)
from respiramfm.encoders.pretrain_model import ColaHead, cola_loss


def test_cola_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.0, 0.0], [3.0, 0.0, 1.0]])
    loss, acc = cola_loss(logits)
    # row i: -log softmax(logits[i])[i]
    r0 = math.log(math.exp(2) + 1 + math.exp(-1)) - 2
    r1 = math.log(math.exp(0.5) + math.exp(1) + 1) - 1
    r2 = math.log(math.exp(3) + 1 + math.exp(1)) - 1
    assert loss.item() == pytest.approx((r0 + r1 + r2) / 3, abs=1e-6)
    assert acc.item() == pytest.approx(2 / 3)  # row 2 picks column 0


def test_cola_loss_rejects_non_square():
    with pytest.raises(ValueError):
        cola_loss(torch.zeros(2, 3))


def test_cola_head_is_bilinear_over_tanh_layernorm_projection():
    torch.manual_seed(0)
    head = ColaHead(in_dim=3, proj_dim=2, dropout=0.1).eval()  # eval: dropout off
    with torch.no_grad():
        head.g.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
        head.g.bias.copy_(torch.tensor([0.5, 0.0]))
        head.linear.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, 3.0]]))
    h1 = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
    h2 = torch.tensor([[-1.0, 0.0, 1.0], [2.0, 2.0, 2.0]])

    def proj(h):
        z = h.numpy() @ np.array([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]).T + np.array([0.5, 0.0])
        z = (z - z.mean(1, keepdims=True)) / np.sqrt(z.var(1, keepdims=True) + 1e-5)
        return np.tanh(z)

    a = proj(h1) @ np.array([[2.0, 1.0], [0.0, 3.0]]).T
    expected = a @ proj(h2).T
    assert np.allclose(head(h1, h2).detach().numpy(), expected, atol=1e-5)


def test_frame_mask_equals_operas_sequential_chain():
    """Same draws, OPERA's loop: masked[i] = start[i] or (masked[i-1] and continue[i])."""
    for seed in range(20):
        n = 300
        got = frame_mask(np.random.default_rng(seed), n)
        rng = np.random.default_rng(seed)
        starts, conts = rng.random(n) < 0.1, rng.random(n) < 0.2
        ref, prev = np.zeros(n, bool), False
        for i in range(n):
            prev = bool(starts[i] or (prev and conts[i]))
            ref[i] = prev
        assert np.array_equal(got, ref)
    # stationary masked fraction of the chain: 0.1 / (1 - 0.28 + 0.1)
    m = frame_mask(np.random.default_rng(1), 200_000)
    assert m.mean() == pytest.approx(0.1 / 0.82, abs=0.005)


def _store(tmp_path, lengths):
    recs = []
    for i, n in enumerate(lengths):
        p = tmp_path / f"s{i}.npy"
        np.save(p, (np.arange(n * 64).reshape(n, 64) % 97 / 97).astype(np.float16))
        recs.append(Recording(f"r{i}", "m.csv", f"a{i}.wav", str(p), n))
    return recs


@pytest.mark.parametrize("memory_mb", [2048.0, 0.0])
def test_two_crops_deterministic_and_shaped(tmp_path, memory_mb):
    store = SpectrogramStore(_store(tmp_path, [120, 30, 251]), memory_limit_mb=memory_mb)
    assert store.in_memory == (memory_mb > 0)
    ds = TwoCropDataset(store, crop_frames=50, seed=3)
    a1, a2 = ds[0]
    assert a1.shape == (50, 64) and a1.dtype == torch.float32
    b1, b2 = ds[0]
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # same (seed, epoch, index) -> same views
    s1, _ = ds[1]  # shorter than the crop: repeated in time
    assert s1.shape == (50, 64)
    ds.set_epoch(1)
    c1, c2 = ds[0]
    assert not torch.equal(a1, c1)
    other = TwoCropDataset(store, crop_frames=50, seed=4)
    assert not torch.equal(other[0][0], a1)


def test_two_crops_without_augmentation_are_exact_slices(tmp_path):
    recs = _store(tmp_path, [80])
    spec = np.load(recs[0].spec_path).astype(np.float32)
    ds = TwoCropDataset(SpectrogramStore(recs), crop_frames=20, seed=0, mask=False, gain=False)
    for e in range(5):
        ds.set_epoch(e)
        for view in ds[0]:
            x = view.numpy()
            starts = [s for s in range(61) if np.array_equal(spec[s:s + 20], x)]
            assert starts, "a view must be a contiguous crop of the spectrogram"


def test_epoch_batches_partition_and_shard():
    full = epoch_batches(10, 3, world=1, rank=0, seed=1, epoch=0)
    assert len(full) == 3 and all(len(b) == 3 for b in full)
    assert len(set(sum(full, []))) == 9  # no repeats, one left over
    assert epoch_batches(10, 3, 1, 0, 1, 0) == full
    assert epoch_batches(10, 3, 1, 0, 1, 1) != full
    r0 = epoch_batches(10, 2, world=2, rank=0, seed=1, epoch=0)
    r1 = epoch_batches(10, 2, world=2, rank=1, seed=1, epoch=0)
    assert len(r0) == len(r1) == 2
    assert not set(sum(r0, [])) & set(sum(r1, []))
