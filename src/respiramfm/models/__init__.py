"""The models of RespiraMFM, apart from how they are trained.

* :mod:`~respiramfm.models.configuration` — every config dataclass (importable without torch);
* :mod:`~respiramfm.models.htsat` (+ ``htsat_layers``) and :mod:`~respiramfm.models.opera_ct` —
  the audio encoder and its strict checkpoint loading;
* :mod:`~respiramfm.models.projector` — the stage-1 projector;
* :mod:`~respiramfm.models.lora`, :mod:`~respiramfm.models.sequence`, :mod:`~respiramfm.models.fusion` —
  LoRA wiring, the stage-2 input layout and the fusion classifier;
* :mod:`~respiramfm.models.base`, :mod:`~respiramfm.models.saved`, :mod:`~respiramfm.models.files` —
  the saved-model base class, the fusion model directory, and checked reading of untrusted files;
* :mod:`~respiramfm.models.processing` — the one input processor (record | path | bytes | waveform
  -> model inputs).

The stage folders (``encoders``, ``align``, ``fusion``, ``evaluate``) keep training and their CLIs.
Names below are loaded on first use, so ``import respiramfm.models`` does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EncoderInfo": "configuration", "FusionConfig": "configuration", "HTSATConfig": "configuration",
    "LoraSettings": "configuration", "ProjectorConfig": "configuration",
    "HTSAT": "htsat", "OperaCT": "opera_ct", "Projector": "projector", "RespiraMFM": "fusion",
    "FusionItem": "sequence", "FusionBatch": "sequence", "SavedModel": "base",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"respiramfm.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'respiramfm.models' has no attribute {name!r}")
