"""Stage-2 training configuration (``respiramfm finetune --config FILE --set key=value``).

Kept apart from the trainer so the evaluation protocol and baselines can build and pass
configs without importing the training loop. ``optim`` is the shared
:class:`respiramfm.training.config.OptimConfig`; :func:`finetune_budget` turns the flat
run-length keys into the engine's :class:`~respiramfm.training.config.Budget`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from respiramfm.errors import ConfigError
from respiramfm.evaluate.operating import ThresholdConfig
from respiramfm.fusion.data import MIXINGS
from respiramfm.models.configuration import FusionConfig
from respiramfm.training.config import SCHEDULES, Budget, OptimConfig

# Settings that may change between a killed run and its resumption without changing the result.
# Data paths may move: the data themselves are fingerprinted (and the projector hashed) separately.
RESUME_FREE = ("out_dir", "device", "threads", "progress", "resume", "log_every", "manifests", "audio_store",
               "task_files", "projector", "trunk_cache_dir")
SELECT_KEYS = {"auroc": ("val_mean_auroc", "max"), "loss": ("val_loss", "min")}


@dataclass
class FinetuneConfig:
    manifests: list[str] = field(default_factory=list)
    task_files: list[str] = field(default_factory=list)    # extra task definitions (e.g. the simulated cohort's)
    audio_store: list[str] = field(default_factory=list)   # `respiramfm embed` output dir(s)
    projector: str = ""                                    # `respiramfm align` output dir
    tasks: list[str] = field(default_factory=list)         # [] = every supervised task (T1-T4)
    mixing: str = "concat"                                 # concat (official) | proportional | balanced
    group_by_task: bool = True                             # task-homogeneous step batches (shared prompt)
    group_by_length: bool = True
    val_fraction: float = 0.15                             # only when the manifests have no val rows
    model: FusionConfig = field(default_factory=FusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 4                                    # per process and accumulation round
    grad_accum: int = 1
    epochs: int = 20
    max_steps: int = 0                                     # > 0: stop after that many optimiser steps
    precision: str = "fp32"                                # fp32 | bf16 | auto (bf16 where it is faster here)
    seed: int = 420
    eval_every: int = 0                                    # optimiser steps between validations; 0 = per epoch
    eval_batch_size: int = 32
    select_metric: str = "auroc"                           # auroc (mean over tasks) | loss
    patience: int = 0                                      # evaluations without improvement; 0 = never stop
    checkpoint_every: int = 100                            # optimiser steps (and every epoch end)
    resume: bool = True
    out_dir: str = "runs/finetune"
    device: str = "auto"                                   # auto | cpu | cuda
    threads: int = 0                                       # torch CPU threads (0 = leave)
    progress: bool = True
    log_every: int = 10
    trunk_cache: bool = False       # with model.lora.top_layers: train on cached states of the frozen layers below
    trunk_cache_dir: str = ""       # "" = the user cache (shared by runs, seeds and systems; keyed by content)
    accept_eval_trunk: bool = False  # allow the cache although layers below the cut have dropout (run in eval mode)
    # each task's decision threshold, chosen on validation and saved with the model: youden | sensitivity (target)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)

    def validate(self) -> "FinetuneConfig":
        if self.mixing not in MIXINGS:
            raise ConfigError(f"mixing must be one of {MIXINGS}, got {self.mixing!r}")
        if self.optim.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {self.optim.schedule!r}")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ConfigError(f"precision must be fp32, bf16 or auto, got {self.precision!r}")
        if self.select_metric not in SELECT_KEYS:
            raise ConfigError(f"select_metric must be auroc or loss, got {self.select_metric!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("batch_size", "grad_accum", "epochs", "checkpoint_every", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if min(self.max_steps, self.eval_every, self.patience, self.threads, self.optim.warmup_steps) < 0:
            raise ConfigError("max_steps, eval_every, patience, threads and optim.warmup_steps must be >= 0")
        self.optim.validate()
        self.threshold.validate()
        if not self.projector and self.model.mode != "text_only":
            raise ConfigError("projector is not set (the `respiramfm align` output directory)")
        self.model.validate()
        return self


def finetune_budget(cfg: FinetuneConfig) -> Budget:
    """The engine's budget of a stage-2 run (validation every ``eval_every`` steps or per epoch)."""
    key, mode = SELECT_KEYS[cfg.select_metric]
    return Budget(optim=cfg.optim, epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                  grad_accum=cfg.grad_accum, eval_every=cfg.eval_every, eval_unit="step", select_metric=key,
                  select_mode=mode, patience=cfg.patience, mixing=cfg.mixing)


__all__ = ["FinetuneConfig", "OptimConfig", "RESUME_FREE", "SCHEDULES", "SELECT_KEYS", "ThresholdConfig",
           "finetune_budget"]
