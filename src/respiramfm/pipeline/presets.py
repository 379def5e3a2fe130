"""The two presets of the pipeline recipe: the offline SIMULATED demo and the real-data run.

``simulated`` is what `respiramfm demo` (and `make demo`) runs: the simulated cohort, the
``logmel-stats`` encoder (the released OPERA-CT weights cannot be fetched offline; a tiny
HTS-AT can be pretrained instead), SmolLM2-135M cut to its first 4 decoder layers in both
stages, bf16 autocast, the paper's input order [audio | prompt | context] so the head's last
token follows the symptom text, and every baseline over two seeds: about 10 LLM trainings,
sized for two CPU cores. ``quick`` keeps one seed and four systems.

``real`` runs the paper's T1-T9 on datasets under ``data_root`` with the repository's
``configs/{align,finetune,evaluate}.yaml``, the OPERA-CT checkpoint and Phi-2 by default.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from respiramfm.align.train import AlignConfig
from respiramfm.config import load_config
from respiramfm.encoders.pretrain import EncoderSize, PretrainConfig
from respiramfm.errors import ConfigError
from respiramfm.evaluate.config import EvaluateConfig
from respiramfm.fusion.train_config import FinetuneConfig
from respiramfm.pipeline.config import CohortConfig, EncoderStage, PipelineConfig

SYSTEMS = ["respiramfm", "no_alignment", "respllm", "text_only", "audio_only", "missing_text", "bts_frozen"]
QUICK_SYSTEMS = ["respiramfm", "no_alignment", "respllm", "bts_frozen"]
REAL_QUICK_SYSTEMS = ["respiramfm", "bts_frozen"]
CONFIGS = Path(__file__).resolve().parents[3] / "configs"  # the source checkout's configs/


def config_file(name: str) -> Path | None:
    """``configs/NAME`` from the working directory, else from the source checkout; ``None`` when absent."""
    for base in (Path.cwd() / "configs", CONFIGS):
        if (base / name).is_file():
            return base / name
    return None


def _tiny_pretrain(quick: bool) -> PretrainConfig:
    """The tiny HTS-AT the demo can pretrain (embed 16, depths 1-1-2-1 -> 128-d latents)."""
    return PretrainConfig(encoder=EncoderSize(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8]),
                          proj_dim=128, crop_frames=50, batch_size=32, lr=1.0e-3, lr_decay=0.99,
                          max_steps=20 if quick else 40, save_every=20, seed=42, progress=False)


def _demo_finetune(backbone: str, layers: int) -> FinetuneConfig:
    """Stage 2 on SmolLM2-135M, sized for two CPU cores (shared by every LLM system of the evaluation)."""
    ft = FinetuneConfig(precision="bf16", group_by_task=False, batch_size=16, eval_every=0, eval_batch_size=32,
                        patience=0, checkpoint_every=1000, log_every=10, epochs=2, progress=False)
    ft.model.order = ["audio", "prompt", "context"]
    ft.model.backbone, ft.model.num_layers = backbone, layers
    ft.model.lora.r, ft.model.lora.alpha = 8, 16
    ft.optim.lr, ft.optim.warmup_steps, ft.optim.weight_decay = 5.0e-4, 5, 0.0
    return ft


def simulated(quick: bool = False, seed: int = 0, backbone: str | None = None, llm_layers: int | None = None,
              efficiency: str | None = None, pretrain_encoder: bool = False, opera_checkpoint: str | None = None,
              out: str = "runs/demo") -> PipelineConfig:
    """The offline demo on the SIMULATED cohort (see the module doc)."""
    layers = 4 if llm_layers is None else int(llm_layers)
    ft = _demo_finetune(backbone or "smollm2-135m", layers)
    e2e = {"epochs": ft.epochs, "batch_size": 16, "lr": 5.0e-4, "patience": 0}
    ev = EvaluateConfig(seeds=[0] if quick else [0, 1], systems=list(QUICK_SYSTEMS if quick else SYSTEMS),
                        n_boot=300 if quick else 1000, quick=quick,
                        systems_options={"respllm": {"e2e": dict(e2e)}, "no_alignment": {"e2e": dict(e2e)}},
                        data_efficiency=("" if quick else "bts_frozen") if efficiency is None else efficiency)
    encoder = EncoderStage(pretrain=pretrain_encoder)
    if opera_checkpoint:
        encoder = EncoderStage(name="opera-ct", checkpoint=str(opera_checkpoint))
    return PipelineConfig(preset="simulated", out=str(out), seed=seed, quick=quick, cohort=CohortConfig(quick=quick),
                          encoder=encoder, pretrain=_tiny_pretrain(quick),
                          align=AlignConfig(epochs=60 if quick else 200, eval_every=10, checkpoint_every=50, seed=0),
                          finetune=ft, evaluate=ev)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def real(data_root: str | os.PathLike, opera_checkpoint: str | None, quick: bool = False, seed: int = 0,
         backbone: str | None = None, llm_layers: int | None = None, finetune_config: str | None = None,
         out: str = "runs/demo") -> PipelineConfig:
    """The paper's T1-T9 on real datasets with the repository's configs (see the module doc)."""
    ft_file = finetune_config or config_file("finetune.yaml")
    if ft_file and not Path(ft_file).is_file():
        raise ConfigError("stage-2 config not found", path=ft_file)
    ft = load_config(FinetuneConfig, ft_file)
    ft.model.backbone, ft.model.num_layers = backbone or "phi-2", int(llm_layers or 0)
    ft.progress = False
    if quick:
        ft.epochs = 2
    align = load_config(AlignConfig, config_file("align.yaml"))
    if quick:
        align.epochs = 60
    ev = load_config(EvaluateConfig, config_file("evaluate.yaml"))
    ev.quick = quick
    if quick:
        ev.seeds, ev.n_boot, ev.systems = [0], 300, list(REAL_QUICK_SYSTEMS)
    return PipelineConfig(preset="real", out=str(out), data_root=str(data_root), seed=seed, quick=quick,
                          device=_device(), encoder=EncoderStage(name="opera-ct", checkpoint=str(opera_checkpoint or "")),
                          align=align, finetune=ft, evaluate=ev)


__all__ = ["QUICK_SYSTEMS", "SYSTEMS", "config_file", "real", "simulated"]
