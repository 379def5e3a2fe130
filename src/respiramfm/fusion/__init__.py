"""Stage 2: the RespiraMFM fusion classifier (frozen projector + LLM with LoRA + linear head).

Public API (heavy imports happen lazily, so ``import respiramfm.fusion`` stays cheap)::

    from respiramfm.fusion import FusionConfig, RespiraMFM, FusionItem, Predictor
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EncoderInfo": "respiramfm.fusion.model",
    "FusionConfig": "respiramfm.fusion.model",
    "RespiraMFM": "respiramfm.fusion.model",
    "load_configured_backbone": "respiramfm.fusion.model",
    "LoraSettings": "respiramfm.fusion.lora",
    "target_modules": "respiramfm.fusion.lora",
    "FusionItem": "respiramfm.fusion.sequence",
    "FusionBatch": "respiramfm.fusion.sequence",
    "ResolvedItem": "respiramfm.fusion.sequence",
    "save_pretrained": "respiramfm.fusion.saved",
    "load_pretrained": "respiramfm.fusion.saved",
    "read_config": "respiramfm.fusion.saved",
    "Predictor": "respiramfm.fusion.predict",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'respiramfm.fusion' has no attribute {name!r}")
