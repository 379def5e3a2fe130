"""``PipelineConfig``: one typed config for the whole pipeline run (YAML-loadable, ``--set`` overrides).

Each stage keeps its own config dataclass (``align``, ``finetune``, ``evaluate``, ``pretrain``);
the pipeline adds what joins them: where the data come from (the simulated cohort or a
real-data root), the audio encoder and the text LLM, the output folder and the threads.
Every input/output path inside the stage configs is set by the recipe from ``out``
(:class:`respiramfm.pipeline.layout.PipelineLayout`), so a config never names them.

    respiramfm demo --quick --set finetune.epochs=1 --set evaluate.n_boot=100
"""

from __future__ import annotations

from dataclasses import dataclass, field

from respiramfm.align.train import AlignConfig
from respiramfm.encoders.pretrain import PretrainConfig
from respiramfm.errors import ConfigError
from respiramfm.evaluate.config import EvaluateConfig
from respiramfm.fusion.train_config import FinetuneConfig
from respiramfm.pipeline.folds import CrossValidation

PRESETS = ("simulated", "real", "real-lung")


@dataclass
class CohortConfig:
    """The SIMULATED cohort (``preset: simulated``); ``None`` = the generator's (quick or full) default."""

    quick: bool = False
    n_patients: int | None = None
    recordings_per_patient: int | None = None
    datasets: list[str] = field(default_factory=list)    # [] = every simulated dataset


@dataclass
class EncoderStage:
    """The frozen audio encoder of ``embed``."""

    name: str = "logmel-stats"       # a registered encoder (logmel-stats, opera-ct, ...)
    checkpoint: str = ""             # weights, for encoders that need them (opera-ct)
    pretrain: bool = False           # pretrain a tiny HTS-AT OPERA-style first and embed with it
    batch_size: int = 16


@dataclass
class TextStage:
    """The frozen LLM of ``embed-text`` (stage 1's targets); stage 2 uses ``finetune.model``'s backbone."""

    batch_size: int = 16


@dataclass
class PipelineConfig:
    preset: str = "simulated"        # simulated | real
    out: str = "runs/demo"
    data_root: str = ""              # real: one folder per dataset (icbhi/, kauh/, ...)
    seed: int = 0                    # cohort seed (simulated) or split seed (real)
    quick: bool = False
    device: str = "cpu"              # cpu | cuda (embedding, LLM stages)
    threads: int = 0                 # torch intra-op threads; 0 = detect (respiramfm.pipeline.threads)
    cohort: CohortConfig = field(default_factory=CohortConfig)
    encoder: EncoderStage = field(default_factory=EncoderStage)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    text: TextStage = field(default_factory=TextStage)
    align: AlignConfig = field(default_factory=AlignConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    cv: CrossValidation = field(default_factory=CrossValidation)   # real-lung: ICBHI k-fold (pipeline.folds)

    def validate(self) -> "PipelineConfig":
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.preset == "real-lung":
            self.cv.validate()
        if self.preset in ("real", "real-lung") and not self.data_root:
            raise ConfigError("the real-data pipeline needs data_root (--data-root DIR)")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = detect), got {self.threads}")
        if self.finetune.model.num_layers < 0:
            raise ConfigError(f"--llm-layers must be >= 0, got {self.finetune.model.num_layers}")
        if not self.evaluate.seeds:
            raise ConfigError("evaluate.seeds must not be empty")
        return self


__all__ = ["CohortConfig", "EncoderStage", "PRESETS", "PipelineConfig", "TextStage"]
