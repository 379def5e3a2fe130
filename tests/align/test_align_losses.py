"""Stage-1 losses against hand-computed values on a 3-pair example."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from respiramfm.align.losses import (
    LOGIT_SCALE_MAX,
    ContrastiveLoss,
    clip_loss,
    contrastive_loss,
    duplicate_mask,
    dup_aware_loss,
    infonce_loss,
)

# Three pairs in 2-D. After L2 normalisation the cosine matrix S = a·tᵀ is
#   [[1.0, 0.0, -0.70710678],
#    [0.6, 0.8,  0.14142136],
#    [0.0, 1.0,  0.70710678]]
A = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
T = np.array([[2.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
# Texts 0 and 2 identical (same context): S2 = [[1, 0, 1], [.6, .8, .6], [0, 1, 0]]
T_DUP = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
IDS_DUP = np.array([0, 1, 0])


def _nrm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ce(logits, targets):
    """Mean soft-label cross-entropy, written out: -Σ_j y_ij (L_ij - logΣ_k exp L_ik)."""
    finite = np.where(np.isfinite(logits), logits, -np.inf)
    lse = np.log(np.exp(finite).sum(axis=1))
    logp = finite - lse[:, None]
    return float(np.mean(-np.sum(targets * np.where(targets > 0, logp, 0.0), axis=1)))


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_cosine_matrix_is_what_the_comments_say():
    s = _nrm(A) @ _nrm(T).T
    expected = [[1, 0, -math.sqrt(0.5)], [0.6, 0.8, math.sqrt(0.02)], [0, 1, math.sqrt(0.5)]]
    np.testing.assert_allclose(s, expected, atol=1e-12)


def test_infonce_matches_hand_value():
    s = _nrm(A) @ _nrm(T).T
    expected = _ce(s / 0.07, np.eye(3))
    assert expected == pytest.approx(1.4184104185075548, abs=1e-12)
    got = infonce_loss(_t(A), _t(T), tau=0.07)
    assert float(got) == pytest.approx(expected, abs=1e-10)
    # another temperature, and the module form (fixed τ, no parameter)
    assert float(infonce_loss(_t(A), _t(T), tau=0.5)) == pytest.approx(0.6429879004539268, abs=1e-10)
    mod = ContrastiveLoss("infonce", tau=0.07)
    assert list(mod.parameters()) == []
    assert float(mod(_t(A), _t(T))) == pytest.approx(expected, abs=1e-10)


def test_infonce_is_one_directional():
    # swapping the roles changes the value: only audio→text is scored
    assert float(infonce_loss(_t(A), _t(T))) != pytest.approx(float(infonce_loss(_t(T), _t(A))), abs=1e-3)


def test_clip_matches_hand_value():
    s = _nrm(A) @ _nrm(T).T
    for log_scale, literal in ((math.log(1 / 0.07), 1.1953035940269678), (1.0, 0.5728719990221294)):
        k = math.exp(log_scale)
        expected = 0.5 * (_ce(k * s, np.eye(3)) + _ce(k * s.T, np.eye(3)))
        assert expected == pytest.approx(literal, abs=1e-12)
        got = clip_loss(_t(A), _t(T), torch.tensor(log_scale, dtype=torch.float64))
        assert float(got) == pytest.approx(expected, abs=1e-10)
    mod = ContrastiveLoss("clip", tau=0.07).double()
    assert float(mod.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    # the parameter was created in float32, so log(1/0.07) carries float32 rounding
    assert float(mod(_t(A), _t(T)).detach()) == pytest.approx(1.1953035940269678, abs=1e-7)


def test_dup_aware_masks_identical_texts_out_of_the_negatives():
    s2 = _nrm(A) @ _nrm(T_DUP).T
    mask = (IDS_DUP[:, None] == IDS_DUP[None, :]) & ~np.eye(3, dtype=bool)
    assert mask.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    l_masked = np.where(mask, -np.inf, math.e * s2)
    expected = 0.5 * (_ce(l_masked, np.eye(3)) + _ce(l_masked.T, np.eye(3)))
    assert expected == pytest.approx(1.1265662054392545, abs=1e-12)
    got = dup_aware_loss(_t(A), _t(T_DUP), torch.tensor(IDS_DUP), torch.tensor(1.0, dtype=torch.float64))
    assert float(got) == pytest.approx(expected, abs=1e-10)
    assert duplicate_mask(torch.tensor(IDS_DUP), torch.tensor(IDS_DUP)).tolist() == mask.tolist()
    # lower than plain CLIP on the same batch: the irreducible log-k floor is gone
    assert float(got) < float(clip_loss(_t(A), _t(T_DUP), torch.tensor(1.0, dtype=torch.float64)))


def test_dup_aware_equals_clip_without_duplicates():
    ids = torch.arange(3)
    ls = torch.tensor(1.0, dtype=torch.float64)
    assert float(dup_aware_loss(_t(A), _t(T), ids, ls)) == pytest.approx(float(clip_loss(_t(A), _t(T), ls)), abs=1e-12)


def test_soft_uniform_targets_would_equal_plain_clip_on_exact_duplicates():
    """Why dup_aware masks instead: the soft-target variant is a no-op (value and gradient)."""
    ids = torch.tensor(IDS_DUP)
    pos = (ids[:, None] == ids[None, :]).double()
    soft = pos / pos.sum(1, keepdim=True)
    a = _t(A).requires_grad_(True)
    t = torch.nn.functional.normalize(_t(T_DUP), dim=1)
    za = torch.nn.functional.normalize(a, dim=1)
    logits = math.e * za @ t.T
    ce = torch.nn.functional.cross_entropy
    soft_loss = 0.5 * (ce(logits, soft) + ce(logits.T, soft))
    (g_soft,) = torch.autograd.grad(soft_loss, a)
    a2 = _t(A).requires_grad_(True)
    hard = clip_loss(a2, _t(T_DUP), torch.tensor(1.0, dtype=torch.float64))
    (g_hard,) = torch.autograd.grad(hard, a2)
    assert float(soft_loss.detach()) == pytest.approx(float(hard.detach()), abs=1e-12)
    torch.testing.assert_close(g_soft, g_hard, atol=1e-12, rtol=0)
    # ... whereas masking changes the gradient
    a3 = _t(A).requires_grad_(True)
    (g_mask,) = torch.autograd.grad(dup_aware_loss(a3, _t(T_DUP), ids, torch.tensor(1.0, dtype=torch.float64)), a3)
    assert not torch.allclose(g_mask, g_hard, atol=1e-6)


def test_local_rows_against_gathered_columns_use_the_offset():
    a, t = torch.nn.functional.normalize(_t(A), dim=1), torch.nn.functional.normalize(_t(T), dim=1)
    full = contrastive_loss(a, t, a, t, 2.0, "clip")
    parts = [contrastive_loss(a[i:i + 1], t[i:i + 1], a, t, 2.0, "clip", offset=i) for i in range(3)]
    assert float(sum(parts) / 3) == pytest.approx(float(full), abs=1e-12)


def test_logit_scale_clamped_in_place_after_a_step():
    mod = ContrastiveLoss("clip", tau=0.07)
    param = mod.logit_scale
    opt = torch.optim.SGD(mod.parameters(), lr=1.0)
    with torch.no_grad():
        mod.logit_scale.fill_(LOGIT_SCALE_MAX - 0.01)
    mod.logit_scale.grad = torch.tensor(-5.0)      # a step that would overshoot ln 100
    opt.step()
    assert float(mod.logit_scale.detach()) > LOGIT_SCALE_MAX
    mod.clamp_()
    assert mod.logit_scale is param                # same tensor: clamped in place
    assert float(mod.logit_scale.detach()) == pytest.approx(math.log(100.0))
    assert mod.current_scale() == pytest.approx(100.0, rel=1e-6)
    mod.logit_scale.grad = torch.tensor(50.0)
    opt.step()
    mod.clamp_()
    assert float(mod.logit_scale.detach()) == 0.0
    assert mod.current_scale() == 1.0


def test_scale_is_exp_of_the_parameter_and_learns():
    mod = ContrastiveLoss("dup_aware", tau=0.07)
    assert mod.current_scale() == pytest.approx(1 / 0.07, rel=1e-6)
    loss = mod(torch.randn(8, 4), torch.randn(8, 4), torch.arange(8))
    loss.backward()
    assert mod.logit_scale.grad is not None and float(mod.logit_scale.grad) != 0.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        ContrastiveLoss("triplet")
    with pytest.raises(ValueError):
        ContrastiveLoss("clip", tau=0.0)
    with pytest.raises(ValueError):
        ContrastiveLoss("dup_aware")(torch.randn(2, 3), torch.randn(2, 3))
