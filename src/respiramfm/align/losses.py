"""Contrastive losses for stage 1: audio→text InfoNCE, CLIP's symmetric loss, and a duplicate-aware variant.

All three L2-normalise both sides and score pairs by scaled cosine similarity.

* ``infonce``   — the official RespiraMFM loss (docs/paper.md §4): audio→text only, fixed
  temperature τ = 0.07, cross-entropy of ``a·tᵀ/τ`` against the diagonal.
* ``clip``      — open_clip's convention (docs/paper.md §8): symmetric
  ``[CE(s·A·Tᵀ) + CE(s·T·Aᵀ)]/2`` with a learnable ``logit_scale`` (log space, initialised
  at ``log(1/τ)``, used as ``exp``, clamped in place to ``[0, ln 100]`` after every step).
* ``dup_aware`` — ``clip`` that knows about duplicate texts. Many patients share a
  context verbatim ("Gender: male. Age: 30. Patient presents with no obvious respiratory
  symptoms."), so a batch often holds several identical text columns. Each row keeps its
  own pair as the positive and the *other* columns with the same text id are **masked out
  of its negatives** (their logits set to −inf), so the model is never asked to prefer one
  copy of a text over an identical copy.

  Why masking and not soft targets spread uniformly over the same-text columns: for exact
  duplicates the soft-target loss is *identical* to plain ``clip`` — value and gradient.
  Audio→text: the duplicate columns carry equal logits, so the soft target's average of
  their log-probabilities equals the log-probability of the own column. Text→audio: the
  duplicate rows are identical, and the sum of their hard-label losses equals the sum of
  their soft-label losses. (``tests/align/test_align_losses.py`` checks this numerically.) Plain
  CLIP's optimum for k identical texts is already the uniform 1/k split; what it adds is an
  irreducible ``log k`` floor and a pull on each positive that is cancelled by the push
  from its identical copies (net pull ``1 − Σ p_copies``). Masking removes the copies from
  the softmax, so the floor is 0 and each pair gets the full pull ``1 − p_own``. Without
  duplicates ``dup_aware`` equals ``clip`` exactly.

Distributed training follows open_clip's "gather with grad + local loss": each rank
normalises its local rows, all-gathers both sides with :func:`gather_with_grad` (whose
backward sums the incoming gradients across ranks), and scores only its local rows against
all gathered columns. With per-rank mean losses and gradients averaged across ranks (what
DDP does), loss and gradients equal the single-process loss on the concatenated batch.
All ranks must hold the same number of rows (``all_gather`` needs equal shapes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOSS_KINDS = ("infonce", "clip", "dup_aware")
LOGIT_SCALE_MAX = math.log(100.0)


def _dist_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when not distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward all-reduces (sums) the full gradient and keeps the local slice.

    Every rank's loss depends on every rank's rows, so the gradient reaching rank r's
    rows is the sum over ranks of each rank's loss gradient w.r.t. them. Written as a
    plain autograd Function because it needs only ``all_gather`` and ``all_reduce``,
    which every backend (gloo included) implements.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.world, ctx.n = dist.get_rank(), dist.get_world_size(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0, keeping the autograd graph (backward sums gradients over ranks)."""
    _, world = _dist_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without a graph (for integer text ids)."""
    _, world = _dist_world()
    if world == 1:
        return x
    import torch.distributed as dist

    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def duplicate_mask(row_ids: torch.Tensor, col_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """True where column j has row i's text id but is not row i's own pair (column ``offset + i``)."""
    same = row_ids.reshape(-1, 1) == col_ids.reshape(1, -1)
    own = torch.arange(row_ids.numel(), device=row_ids.device) + offset
    same[torch.arange(row_ids.numel(), device=row_ids.device), own] = False
    return same


def contrastive_loss(
    a_rows: torch.Tensor,
    t_rows: torch.Tensor,
    a_cols: torch.Tensor,
    t_cols: torch.Tensor,
    scale: torch.Tensor | float,
    kind: str,
    offset: int = 0,
    row_ids: torch.Tensor | None = None,
    col_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss of the (already normalised) rows against all columns.

    Row ``i``'s own pair is column ``offset + i`` (``offset`` = rank·local batch when the
    columns were gathered from several processes; 0 on one process).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")
    target = torch.arange(a_rows.shape[0], device=a_rows.device) + offset
    logits_a = scale * (a_rows @ t_cols.T)
    mask = None
    if kind == "dup_aware":
        if row_ids is None or col_ids is None:
            raise ValueError("dup_aware needs text ids for rows and columns")
        mask = duplicate_mask(row_ids, col_ids, offset)
        logits_a = logits_a.masked_fill(mask, float("-inf"))
    loss_a = F.cross_entropy(logits_a, target)
    if kind == "infonce":
        return loss_a
    logits_t = scale * (t_rows @ a_cols.T)
    if mask is not None:
        logits_t = logits_t.masked_fill(mask, float("-inf"))
    return 0.5 * (loss_a + F.cross_entropy(logits_t, target))


def infonce_loss(audio: torch.Tensor, text: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Official audio→text InfoNCE with a fixed temperature (inputs need not be normalised)."""
    a, t = F.normalize(audio, dim=-1), F.normalize(text, dim=-1)
    return contrastive_loss(a, t, a, t, 1.0 / tau, "infonce")


def clip_loss(audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss; ``logit_scale`` is the log of the multiplier (exp is applied here)."""
    a, t = F.normalize(audio, dim=-1), F.normalize(text, dim=-1)
    return contrastive_loss(a, t, a, t, logit_scale.exp(), "clip")


def dup_aware_loss(audio: torch.Tensor, text: torch.Tensor, text_ids: torch.Tensor,
                   logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with same-text columns (other than the own pair) removed from the negatives."""
    a, t = F.normalize(audio, dim=-1), F.normalize(text, dim=-1)
    return contrastive_loss(a, t, a, t, logit_scale.exp(), "dup_aware", row_ids=text_ids, col_ids=text_ids)


class ContrastiveLoss(nn.Module):
    """The configured stage-1 loss, distributed-aware; owns the learnable ``logit_scale`` if any.

    ``infonce`` keeps ``1/τ`` fixed (no parameter). ``clip`` and ``dup_aware`` hold
    ``logit_scale = log(1/τ)`` as a parameter: give it to the optimiser and call
    :meth:`clamp_` after every optimiser step.
    """

    def __init__(self, kind: str = "infonce", tau: float = 0.07):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")
        if not tau > 0:
            raise ValueError(f"temperature must be positive, got {tau!r}")
        self.kind = kind
        self.tau = float(tau)
        if kind == "infonce":
            self.logit_scale = None
        else:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau)))

    def scale(self) -> torch.Tensor | float:
        """The multiplier applied to cosine similarities (``exp(logit_scale)`` or ``1/τ``)."""
        return 1.0 / self.tau if self.logit_scale is None else self.logit_scale.exp()

    def forward(self, audio: torch.Tensor, text: torch.Tensor, text_ids: torch.Tensor | None = None) -> torch.Tensor:
        a, t = F.normalize(audio, dim=-1), F.normalize(text, dim=-1)
        rank, world = _dist_world()
        if self.kind == "dup_aware" and text_ids is None:
            raise ValueError("dup_aware needs the batch's text ids")
        if world == 1:
            return contrastive_loss(a, t, a, t, self.scale(), self.kind, 0, text_ids, text_ids)
        a_all, t_all = gather_with_grad(a), gather_with_grad(t)
        ids_all = gather_no_grad(text_ids) if text_ids is not None else None
        return contrastive_loss(a, t, a_all, t_all, self.scale(), self.kind, rank * a.shape[0], text_ids, ids_all)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp ``logit_scale`` in place to ``[0, ln 100]`` (open_clip; call after each step)."""
        if self.logit_scale is not None:
            self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def current_scale(self) -> float:
        s = self.scale()
        return float(s.detach()) if isinstance(s, torch.Tensor) else float(s)
