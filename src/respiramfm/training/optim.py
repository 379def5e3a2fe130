"""Optimiser and learning-rate schedule from an :class:`~respiramfm.training.config.OptimConfig`."""

from __future__ import annotations

import math

import torch

from respiramfm.training.config import OptimConfig

PER_EPOCH = ("official", "exponential")  # schedules stepped at epoch ends; the others after every step


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """LR multiplier per optimiser step for ``schedule=cosine`` (warmup, then cosine to min_lr)."""
    floor = cfg.min_lr / cfg.lr

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(cfg: OptimConfig, params, device: torch.device | None = None) -> torch.optim.Optimizer:
    """Adam or AdamW over ``params`` (fused on CPU/CUDA when ``cfg.fused``: same maths, one kernel)."""
    kw = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.fused and device is not None and device.type in ("cpu", "cuda"):
        kw["fused"] = True
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, **kw)


def make_scheduler(cfg: OptimConfig, opt: torch.optim.Optimizer, total_steps: int):
    """The schedule of ``cfg.schedule``; :data:`PER_EPOCH` ones are stepped at epoch ends."""
    if cfg.schedule == "official":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.t_max, eta_min=cfg.min_lr)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    if cfg.schedule == "exponential":
        decay = cfg.decay
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: decay**epoch)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


__all__ = ["PER_EPOCH", "lr_lambda", "make_optimizer", "make_scheduler"]
