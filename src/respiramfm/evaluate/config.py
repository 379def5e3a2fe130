"""``EvaluateConfig``: the settings of one `respiramfm evaluate` run (``configs/evaluate.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from respiramfm.errors import ConfigError
from respiramfm.fusion.train_config import FinetuneConfig


@dataclass
class EvaluateConfig:
    manifests: list[str] = field(default_factory=list)
    task_files: list[str] = field(default_factory=list)     # task definitions (e.g. the simulated cohort's)
    audio_store: list[str] = field(default_factory=list)    # `respiramfm embed` output dir(s)
    text_store: str = ""                                    # `respiramfm embed-text` output dir (baselines)
    projector: str = ""                                     # `respiramfm align` output dir
    encoder: str = ""                                       # encoder checkpoint (provenance only)
    tasks: list[str] = field(default_factory=list)          # [] = all tasks of task_files, else built-in T1-T9
    systems: list[str] = field(default_factory=lambda: ["respiramfm"])
    systems_options: dict = field(default_factory=dict)     # {system: {its own options}}
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # the "respiramfm" system's training
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_boot: int = 1000
    out_dir: str = "runs/evaluate"
    report: bool = True                                     # write report.html at the end
    quick: bool = False                                     # passed to systems (shorter training)
    data_efficiency: str = ""                               # a system to retrain on nested training fractions
    efficiency_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
    efficiency_seeds: list[int] = field(default_factory=list)  # [] = the first of `seeds`

    def validate(self) -> "EvaluateConfig":
        if not self.manifests:
            raise ConfigError("no manifest given (manifests=[...])")
        if not self.systems:
            raise ConfigError("no system to evaluate (systems=[...])")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {self.seeds!r}")
        if self.n_boot < 0:
            raise ConfigError("n_boot must be >= 0")
        if self.data_efficiency and not all(0 < f <= 1 for f in self.efficiency_fractions or [0]):
            raise ConfigError(f"efficiency_fractions must lie in (0, 1], got {self.efficiency_fractions!r}")
        return self


__all__ = ["EvaluateConfig"]
