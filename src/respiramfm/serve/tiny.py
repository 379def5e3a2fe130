"""A randomly initialised but complete model directory, for tests and benchmarks of the serving path.

Everything is the real pipeline (OPERA-CT encoder architecture, projector, a
small Llama with the SmolLM2 tokenizer, LoRA, head) at test size, so requests
exercise every step; only the weights are random, so probabilities carry no
meaning. Use a trained model (``respiramfm finetune``) for anything else.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch


def build_tiny_model(directory: str | Path, encoder_checkpoint: str | Path, seed: int = 0) -> Path:
    """Save a tiny-llama RespiraMFM whose encoder is ``encoder_checkpoint`` (copied next to it)."""
    from respiramfm.models.configuration import EncoderInfo, FusionConfig, ProjectorConfig
    from respiramfm.models.projector import build_projector
    from respiramfm.encoders.registry import build_encoder, get_encoder
    from respiramfm.models.fusion import RespiraMFM

    directory = Path(directory)
    enc = build_encoder("opera-ct", str(encoder_checkpoint))
    info = EncoderInfo(name="opera-ct", checkpoint="encoder.safetensors", weights_hash=enc.weights_hash,
                       out_dim=enc.out_dim, frontend=dataclasses.asdict(get_encoder("opera-ct").frontend))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = build_projector(ProjectorConfig(in_dim=enc.out_dim, hidden=64, out_dim=64, final="layernorm"))
        model = RespiraMFM(FusionConfig(backbone="tiny-llama", encoder=info), proj)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    shutil.copy(encoder_checkpoint, directory / "encoder.safetensors")  # relative to the model directory
    return directory


__all__ = ["build_tiny_model"]
