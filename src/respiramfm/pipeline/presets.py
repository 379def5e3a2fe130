"""Named pipeline presets (what ``respiramfm demo --preset NAME`` runs) and the settings they read.

A pipeline preset says where the data come from and which stages run; the stage settings
(stage 1, stage 2, evaluation) come from a *settings preset*, ``configs/NAME/{align,finetune,
evaluate}.yaml`` (:func:`respiramfm.config.resolve_config`): ``paper`` (the paper's and published
code's settings), ``cpu`` (sized for a 2-core CPU) or ``ours`` (``configs/{stage}.yaml``, our
recommended settings). docs/settings.md lists how they differ.

* ``simulated`` (default of ``respiramfm demo`` and ``make demo``): the SIMULATED cohort, the
  ``logmel-stats`` encoder (the released OPERA-CT weights cannot be fetched offline; a tiny HTS-AT
  can be pretrained instead) and the ``cpu`` settings: SmolLM2-135M cut to its first 4 decoder
  layers in both stages, bf16, every baseline over two seeds. ``quick`` keeps one seed and four systems.
* ``real`` (``demo --data-root DIR``): the paper's T1-T9 on datasets under ``data_root`` with the
  OPERA-CT checkpoint and the ``paper`` settings (Phi-2, every layer).

A new preset is a function ``PresetOptions -> PipelineConfig`` registered with :func:`register`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from respiramfm.align.train import AlignConfig
from respiramfm.config import find_config, load_config, resolve_config
from respiramfm.encoders.pretrain import PretrainConfig
from respiramfm.errors import ConfigError
from respiramfm.evaluate.config import EvaluateConfig
from respiramfm.fusion.train_config import FinetuneConfig
from respiramfm.pipeline.config import CohortConfig, EncoderStage, PipelineConfig

SYSTEMS = ["respiramfm", "no_alignment", "no_alignment_linear", "respllm", "text_only", "audio_only", "missing_text",
           "bts_frozen"]
QUICK_SYSTEMS = ["respiramfm", "no_alignment", "respllm", "bts_frozen"]
REAL_QUICK_SYSTEMS = ["respiramfm", "bts_frozen"]


def config_file(name: str) -> Path | None:
    """``configs/NAME`` from the working directory, else from the source checkout; ``None`` when absent."""
    return find_config(name)


@dataclass
class Settings:
    """The stage settings of one settings preset (``configs/NAME/``), each loaded from its YAML file."""

    align: AlignConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig


def load_settings(name: str, finetune_file: str | None = None) -> Settings:
    """Stage 1, stage 2 and the evaluation of settings preset ``name``; ``finetune_file`` replaces its stage 2.

    Every file must exist (a typed error otherwise): a preset never falls back to built-in defaults.
    """
    if finetune_file and not Path(finetune_file).is_file():
        raise ConfigError("stage-2 config not found", path=finetune_file)

    def need(stage: str) -> Path:
        path = resolve_config(name, stage)
        if path is None or not path.is_file():
            raise ConfigError(f"settings preset {name!r}: no {stage} settings", path=path)
        return path

    settings = Settings(load_config(AlignConfig, need("align")),
                        load_config(FinetuneConfig, finetune_file or need("finetune")),
                        load_config(EvaluateConfig, need("evaluate")))
    if finetune_file:  # the given stage 2's budget is every system's (evaluate/budget.py: pipeline_budget)
        settings.evaluate.budget = None
    return settings


@dataclass
class PresetOptions:
    """What the demo's flags say; each pipeline preset reads the options it uses (``None`` = its default)."""

    out: str = "runs/demo"
    quick: bool = False
    seed: int = 0
    settings: str | None = None          # settings preset: paper | cpu | ours | any configs/NAME/
    backbone: str | None = None          # LLM of both stages (default: the settings')
    llm_layers: int | None = None        # keep the LLM's first N decoder layers (0 = all; default: the settings')
    finetune_config: str | None = None   # a stage-2 YAML replacing the settings'
    data_root: str | None = None         # real presets: one folder per dataset
    opera_checkpoint: str | None = None
    pretrain_encoder: bool = False       # simulated: pretrain a tiny HTS-AT first
    efficiency: str | None = None        # simulated: system of the data-efficiency curve


@dataclass(frozen=True)
class PipelinePreset:
    name: str
    build: Callable[[PresetOptions], PipelineConfig]
    settings: str                        # default settings preset
    needs_data_root: bool
    help: str


PIPELINE_PRESETS: dict[str, PipelinePreset] = {}


def register(preset: PipelinePreset) -> PipelinePreset:
    """Add a named pipeline preset (``respiramfm demo --preset NAME``)."""
    PIPELINE_PRESETS[preset.name] = preset
    return preset


def build(name: str, options: PresetOptions) -> PipelineConfig:
    """The pipeline config of preset ``name`` filled from ``options`` (typed errors for a bad name or options)."""
    if name not in PIPELINE_PRESETS:
        raise ConfigError(f"unknown pipeline preset {name!r}; presets: {', '.join(sorted(PIPELINE_PRESETS))}")
    preset = PIPELINE_PRESETS[name]
    if preset.needs_data_root and not options.data_root:
        raise ConfigError(f"pipeline preset {name!r} needs --data-root DIR")
    if not preset.needs_data_root and options.data_root:
        raise ConfigError(f"pipeline preset {name!r} reads no --data-root (the real-data presets do)")
    if options.llm_layers is not None and options.llm_layers < 0:
        raise ConfigError(f"--llm-layers must be >= 0, got {options.llm_layers}")
    filled = copy.copy(options)
    filled.settings = options.settings or preset.settings
    return preset.build(filled)


def _llm(ft: FinetuneConfig, backbone: str | None, layers: int | None) -> None:
    """``--backbone`` / ``--llm-layers`` replace the settings' LLM (both stages use ``ft.model``)."""
    if backbone:
        ft.model.backbone = backbone
    if layers is not None:
        ft.model.num_layers = int(layers)


def _tiny_pretrain(quick: bool) -> PretrainConfig:
    """The tiny HTS-AT the demo can pretrain (``configs/cpu/pretrain_audio.yaml``; quick: 20 steps)."""
    path = resolve_config("cpu", "pretrain_audio")
    if path is None or not path.is_file():
        raise ConfigError("the demo's encoder pretraining settings are missing", path=path)
    cfg = load_config(PretrainConfig, path)
    if quick:
        cfg.max_steps = min(cfg.max_steps, 20)
    return cfg


def simulated(quick: bool = False, seed: int = 0, backbone: str | None = None, llm_layers: int | None = None,
              efficiency: str | None = None, pretrain_encoder: bool = False, opera_checkpoint: str | None = None,
              out: str = "runs/demo", settings: str = "cpu") -> PipelineConfig:
    """The offline demo on the SIMULATED cohort with settings preset ``settings`` (see the module doc)."""
    s = load_settings(settings)
    _llm(s.finetune, backbone, llm_layers)
    ev = s.evaluate
    if quick:
        s.align.epochs = 60
        ev.seeds, ev.n_boot, ev.systems = ev.seeds[:1], 300, [x for x in ev.systems if x in QUICK_SYSTEMS]
        ev.data_efficiency = ""
    ev.quick = quick
    if efficiency is not None:
        ev.data_efficiency = efficiency
    encoder = EncoderStage(pretrain=pretrain_encoder)
    if opera_checkpoint:
        encoder = EncoderStage(name="opera-ct", checkpoint=str(opera_checkpoint))
    return PipelineConfig(preset="simulated", out=str(out), seed=seed, quick=quick, cohort=CohortConfig(quick=quick),
                          encoder=encoder, pretrain=_tiny_pretrain(quick), align=s.align, finetune=s.finetune,
                          evaluate=ev)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def real(data_root, opera_checkpoint: str | None, quick: bool = False, seed: int = 0, backbone: str | None = None,
         llm_layers: int | None = None, finetune_config: str | None = None, out: str = "runs/demo",
         settings: str = "paper") -> PipelineConfig:
    """The paper's T1-T9 on real datasets with settings preset ``settings`` (see the module doc)."""
    s = load_settings(settings, finetune_config)
    _llm(s.finetune, backbone, llm_layers)
    ev = s.evaluate
    if quick:
        s.finetune.epochs, s.align.epochs = 2, 60
        ev.seeds, ev.n_boot, ev.systems = ev.seeds[:1], 300, list(REAL_QUICK_SYSTEMS)
    ev.quick = quick
    return PipelineConfig(preset="real", out=str(out), data_root=str(data_root), seed=seed, quick=quick,
                          device=_device(), encoder=EncoderStage(name="opera-ct", checkpoint=str(opera_checkpoint or "")),
                          align=s.align, finetune=s.finetune, evaluate=ev)


register(PipelinePreset(
    "simulated", lambda o: simulated(o.quick, o.seed, o.backbone, o.llm_layers, o.efficiency, o.pretrain_encoder,
                                     o.opera_checkpoint, o.out, o.settings),
    settings="cpu", needs_data_root=False, help="the SIMULATED cohort, offline"))
register(PipelinePreset(
    "real", lambda o: real(o.data_root, o.opera_checkpoint, o.quick, o.seed, o.backbone, o.llm_layers,
                           o.finetune_config, o.out, o.settings),
    settings="paper", needs_data_root=True, help="the paper's T1-T9 on real datasets under --data-root"))

__all__ = ["PIPELINE_PRESETS", "PipelinePreset", "PresetOptions", "QUICK_SYSTEMS", "REAL_QUICK_SYSTEMS", "SYSTEMS",
           "Settings", "build", "config_file", "load_settings", "real", "register", "simulated"]
