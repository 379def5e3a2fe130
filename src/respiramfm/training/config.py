"""The optimisation budget every trained system shares (importable without torch).

:class:`OptimConfig` names the optimiser and its learning-rate schedule; :class:`Budget`
adds how long and how a run trains (epochs, batch, accumulation, clipping, validation
cadence, selection and patience, task mixing). Stage configs keep their own YAML keys and turn them
into a :class:`Budget` for :class:`respiramfm.training.engine.Trainer`; the evaluation protocol
holds one :class:`Budget` that every trained system of a run shares
(:mod:`respiramfm.evaluate.budget`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from respiramfm.errors import ConfigError

OPTIMIZERS = ("adamw", "adam")
# cosine: per optimiser step from lr to min_lr (after warmup_steps) | official: CosineAnnealingLR(t_max)
# stepped once per epoch | exponential: lr * decay**epoch | constant
SCHEDULES = ("cosine", "official", "constant", "exponential")
SELECT_MODES = ("max", "min", "last")
UNITS = ("step", "epoch")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: str = "cosine"
    min_lr: float = 1e-6
    warmup_steps: int = 0
    t_max: int = 10000          # "official" only: CosineAnnealingLR(T_max) stepped once per epoch
    max_grad_norm: float = 0.0  # 0 = no clipping
    optimizer: str = "adamw"    # adamw | adam
    decay: float = 1.0          # "exponential" only: factor per epoch
    fused: bool = False         # one fused kernel per step where torch supports it (same maths)

    def validate(self) -> "OptimConfig":
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optim.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0 or len(self.betas) != 2:
            raise ConfigError("optim.lr must be > 0 and optim.betas a pair")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise ConfigError("optim.warmup_steps, optim.max_grad_norm and optim.weight_decay must be >= 0")
        return self


@dataclass
class Budget:
    """How long and how a system trains; what decides the result (not where it is written)."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 1
    max_steps: int = 0          # > 0: stop after that many optimiser steps
    batch_size: int = 4         # per process and accumulation round
    grad_accum: int = 1
    eval_every: int = 0         # validations every N units; 0 = at every epoch end
    eval_unit: str = "step"     # step | epoch
    select_metric: str = ""     # key of the evaluation row that selects the kept weights ("" = no selection)
    select_mode: str = "max"    # max | min | last (always keep the latest evaluation)
    patience: int = 0           # evaluations without improvement before stopping; 0 = never
    # how a multi-task run mixes its tasks into step batches (concat | proportional | balanced); read by the
    # stage-2 and end-to-end tasks when they plan an epoch (respiramfm.fusion.data.plan_epoch), not by the loop
    mixing: str = "concat"

    def validate(self) -> "Budget":
        self.optim.validate()
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if min(self.max_steps, self.eval_every, self.patience) < 0:
            raise ConfigError("max_steps, eval_every and patience must be >= 0")
        if self.eval_unit not in UNITS:
            raise ConfigError(f"eval_unit must be one of {UNITS}, got {self.eval_unit!r}")
        if self.select_mode not in SELECT_MODES:
            raise ConfigError(f"select_mode must be one of {SELECT_MODES}, got {self.select_mode!r}")
        return self


@dataclass
class RunSettings:
    """Where and how a run is carried out; none of these changes the trained weights."""

    out_dir: str = ""               # "" = in memory: no metrics file, no checkpoints
    name: str = "train"             # progress-bar label and TensorBoard run name
    device: str = "auto"            # auto | cpu | cuda
    precision: str = "no"           # no | bf16 | fp16 (autocast through accelerate)
    existing: str = "resume"        # what a checkpoint in out_dir means: resume | restart | refuse
    checkpoint_every: int = 0       # 0 = never
    checkpoint_unit: str = "step"   # step | epoch
    checkpoint_epoch_end: bool = True
    keep_checkpoints: int = 2
    log_every: int = 0              # a training row every N optimiser steps (0 = none)
    log_first: bool = False         # also a row after the first step
    progress: bool = True           # tqdm bar; plain lines on stderr when off
    progress_unit: str = "step"     # step | epoch
    dropout_seed: int | None = None # reseed torch's global RNG before training (fresh runs only)
    data_what: str = "training data"  # how a changed data fingerprint is named in the error

    def validate(self) -> "RunSettings":
        if self.existing not in ("resume", "restart", "refuse"):
            raise ConfigError(f"existing must be resume, restart or refuse, got {self.existing!r}")
        if self.checkpoint_unit not in UNITS or self.progress_unit not in UNITS:
            raise ConfigError(f"checkpoint_unit and progress_unit must be one of {UNITS}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1 or self.log_every < 0:
            raise ConfigError("checkpoint_every and log_every must be >= 0, keep_checkpoints >= 1")
        if self.checkpoint_every and not self.out_dir:
            raise ConfigError("checkpoints need an out_dir")
        return self


__all__ = ["Budget", "OPTIMIZERS", "OptimConfig", "RunSettings", "SCHEDULES", "SELECT_MODES", "UNITS"]
