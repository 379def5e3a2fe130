"""The COLA objective OPERA-CT was pretrained with: projection head, bilinear similarity, loss.

OPERA (evelyn0414/OPERA, ``src/model/models_cola.py``) trains its HTS-AT encoder
with COLA (Saeed et al. 2021): two random crops of the same recording are
encoded, each latent goes through dropout, a linear projection ``g``
(768 -> 512), a LayerNorm and ``tanh``; one side then passes through a bias-free
bilinear map ``W`` (512 x 512). The logits ``W a_i . b_j`` over the batch are
scored with cross-entropy whose target is the diagonal: every crop must pick out
its sibling among the other recordings' crops. There is no temperature and no
L2 normalisation (``tanh`` bounds the features instead). Dropout ``p = 0.1`` is
applied after the encoder, after ``g`` and after ``tanh``, as in OPERA.

The head's parameter names (``g``, ``layer_norm``, ``linear``) are the ones the
released OPERA-CT checkpoint stores next to the encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ColaHead(nn.Module):
    """Projection ``g`` + LayerNorm + tanh, and the bilinear similarity ``linear``."""

    def __init__(self, in_dim: int, proj_dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.g = nn.Linear(in_dim, proj_dim)
        self.layer_norm = nn.LayerNorm(proj_dim)
        self.linear = nn.Linear(proj_dim, proj_dim, bias=False)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Encoder latent (B, in_dim) -> bounded projection (B, proj_dim)."""
        x = self.g(self.dropout(h))
        x = self.dropout(x)
        return self.dropout(torch.tanh(self.layer_norm(x)))

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        """Latents of the two crops -> (B, B) logits; row i should peak at column i."""
        a = self.linear(self.project(h1))
        b = self.project(h2)
        return a @ b.t()


def cola_loss(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy with the diagonal as targets, and in-batch top-1 accuracy.

    ``logits[i, j]`` scores crop 1 of recording i against crop 2 of recording j.
    Chance accuracy is ``1 / B``.
    """
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be square (B, B), got {tuple(logits.shape)}")
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits.float(), target)
    acc = (logits.argmax(dim=1) == target).float().mean()
    return loss, acc


class ColaModel(nn.Module):
    """Encoder + COLA head, as one module so DDP wraps (and averages) both.

    The two crops go through the encoder in two separate calls, as in OPERA, so
    the encoder's input BatchNorm sees each view's own batch statistics.
    """

    def __init__(self, encoder: nn.Module, feat_dim: int, proj_dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.head = ColaHead(feat_dim, proj_dim, dropout)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x1), self.encoder(x2))
