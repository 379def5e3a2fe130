"""``EvaluateConfig``: the settings of one `respiramfm evaluate` run (``configs/evaluate.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from respiramfm.align.train import AlignConfig
from respiramfm.errors import ConfigError
from respiramfm.evaluate.budget import check_budget, conflicts, refuse_implicit, unit_budget
from respiramfm.fusion.train_config import FinetuneConfig
from respiramfm.training.config import Budget


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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # stage 2: model and run settings
    # THE budget of every trained system (evaluate/budget.py); null = finetune's budget keys. A system trains
    # with another one only when written explicitly: systems_options: {NAME: {budget: {epochs: 5}}}
    budget: Budget | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_boot: int = 1000
    out_dir: str = "runs/evaluate"
    report: bool = True                                     # write report.html at the end
    quick: bool = False                                     # passed to systems (shorter training)
    data_efficiency: str = ""                               # a system to retrain on nested training fractions
    efficiency_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
    efficiency_seeds: list[int] = field(default_factory=list)  # [] = the first of `seeds`
    # a finished `respiramfm finetune` run (OUT dir; may hold {seed}) used as RespiraMFM's stage 2 instead of
    # training from `finetune`: its saved config is read and must match this run's data and tasks
    finetune_run: str = ""
    # Stage 1 per seed (respiramfm.evaluate.stage1): every seed (and data-efficiency unit) aligns its own projector
    # with `align` (its data paths filled in) under OUT/stage1/. false = `projector` serves every seed (the spread
    # over seeds then covers stage 2 only, and the tables say so).
    stage1_per_seed: bool = True
    align: AlignConfig = field(default_factory=AlignConfig)
    seed_projectors: dict = field(default_factory=dict)     # {seed: dir}: stage 1 of that seed trained elsewhere
    seed_audio_stores: dict = field(default_factory=dict)   # {seed: [dirs]}: that seed's own encoder's embeddings

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
        if self.stage1_per_seed and (len(self.audio_store) != 1 or not self.text_store):
            raise ConfigError("stage1_per_seed (every seed aligns its own projector) needs exactly one audio_store and "
                              "a text_store (stage 1's inputs); give them, or set stage1_per_seed=false to use "
                              "`projector` for every seed")
        if self.budget is not None:
            check_budget(self.budget)
            clash = conflicts(self.finetune, self.budget)
            if clash:
                raise ConfigError(f"the budget section trains every system, yet finetune sets other values: "
                                  f"{'; '.join(clash)}; write them under budget (or drop them from finetune)")
        for name, options in self.systems_options.items():
            refuse_implicit(dict(options or {}), name)
            unit_budget(self, name)  # an explicit override must be a valid partial budget
        if self.seed_audio_stores and not self.stage1_per_seed:
            raise ConfigError("seed_audio_stores (an encoder per seed) needs stage1_per_seed: a projector is aligned "
                              "with one encoder")
        return self


__all__ = ["EvaluateConfig"]
