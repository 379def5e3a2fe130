"""Tiny stage-2 models for tests: a tiny real-architecture LLM (real SmolLM2 tokenizer) and a small projector.

Tiny LLM backbones alone come from the ``tiny`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import torch

from respiramfm.models.configuration import FusionConfig, ProjectorConfig
from respiramfm.models.fusion import RespiraMFM
from respiramfm.models.projector import build_projector

IN_DIM = 16


def tiny_fusion(arch: str = "llama", seed: int = 0, in_dim: int = IN_DIM, lora_std: float = 0.2,
                head_std: float | None = None, **cfg_kw) -> RespiraMFM:
    """A tiny RespiraMFM (hidden 64) whose LoRA B matrices are non-zero, so the adapters matter.

    LoRA B starts at zero in a fresh model; it is drawn from N(0, ``lora_std``), and the head from
    N(0, ``head_std``) when given. ``cfg_kw`` go to :class:`FusionConfig`.
    """
    torch.manual_seed(seed)
    proj = build_projector(ProjectorConfig(in_dim=in_dim, hidden=32, out_dim=64, final="layernorm"))
    model = RespiraMFM(FusionConfig(backbone=f"tiny-{arch}", **cfg_kw), proj)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, lora_std)
        if head_std is not None:
            model.head.weight.normal_(0.0, head_std)
    return model
