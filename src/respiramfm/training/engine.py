"""The training engine: one loop for encoder pretraining, stage 1, stage 2 and the end-to-end baselines.

A stage describes *what* it trains as a :class:`TrainTask` (parameters, the batches of an
epoch, the loss of a micro-batch, the evaluation, what a checkpoint holds); the
:class:`Trainer` owns *how*: epochs and optimiser steps, gradient accumulation (DDP
``no_sync`` on all but the last micro-batch), accelerate's Accelerator for devices,
processes and autocast, clipping, the learning-rate schedule, evaluation cadence,
selection on validation with patience (:class:`~respiramfm.training.callbacks.BestOnValidation`),
``metrics.jsonl`` + trackers, progress, and resumable checkpoints
(:mod:`respiramfm.training.checkpoint`). A run killed at any point and started again with
the same configuration continues from its last checkpoint and ends bit-identical to an
uninterrupted run: weights, optimiser, schedule, every process's RNG and the task's
generators are restored, and every epoch's batches are a function of the seed and epoch.

The split between the loop and the task follows open_clip's train/evaluate split; the
callbacks follow the HF Trainer's. The design keeps the task in charge of its forward
pass, so a model that takes precomputed inputs (cached embeddings, a frozen-trunk cache)
trains through the same loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from respiramfm.errors import CheckpointError, ConfigError, DataError
from respiramfm.training import checkpoint as ck
from respiramfm.training.callbacks import BEST_PREFIX, BestOnValidation, Callback, MetricsLog, Progress, flat
from respiramfm.training.config import Budget, RunSettings
from respiramfm.training.optim import PER_EPOCH, make_optimizer, make_scheduler

STATE_KEYS = ("step", "epoch", "epoch_step", "best_step", "best_epoch", "best_value", "evals_since_best", "stopped")
CURRENT_PREFIX = "cur::"


_BF16_PAYS: dict[str, bool] = {}


def bf16_pays(device: str = "cpu") -> bool:
    """Whether bf16 autocast makes this machine's matrix products at least 10 % faster than fp32.

    Measured once per process on the CPU (~0.2 s, a stage-2-sized linear layer, alternating rounds,
    best of each): only CPUs with native bf16 dot products (AVX512-BF16, AMX) gain; on an AVX2-only
    CPU torch falls back to a reference bf16 GEMM measured ~25x slower than fp32. True on CUDA.
    """
    if device not in ("cpu", "auto") or (device == "auto" and torch.cuda.is_available()):
        return True
    if "cpu" not in _BF16_PAYS:
        x, lin = torch.randn(512, 576), torch.nn.Linear(576, 576)
        best = {True: float("inf"), False: float("inf")}
        with torch.no_grad():
            for _ in range(3):
                for bf16 in (False, True):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        t0 = time.perf_counter()
                        lin(x)
                        best[bf16] = min(best[bf16], time.perf_counter() - t0)
        _BF16_PAYS["cpu"] = best[True] * 1.1 <= best[False]
    return _BF16_PAYS["cpu"]


def resolve_precision(precision: str, device: str = "auto") -> str:
    """``auto`` -> ``bf16`` where :func:`bf16_pays`, else ``fp32``; any other value unchanged."""
    return ("bf16" if bf16_pays(device) else "fp32") if precision == "auto" else precision


def make_accelerator(device: str = "auto", precision: str = "no", project_dir: str | os.PathLike | None = None):
    """An Accelerator for one run; in a plain (non-launched) process an earlier, differently
    configured accelerate state (e.g. a previous in-process run with another precision) is reset.
    ``precision="auto"``: bf16 autocast only where it is faster here (:func:`resolve_precision`)."""
    from accelerate import Accelerator  # heavy: imported when a run starts, not with the package
    from accelerate.state import AcceleratorState
    from accelerate.utils import is_tensorboard_available

    precision = resolve_precision(precision, device)
    precision = {"fp32": "no", "": "no"}.get(precision, precision)
    kw = dict(cpu=device == "cpu", mixed_precision=precision)
    if project_dir is not None and is_tensorboard_available():  # optional: metrics.jsonl is always written
        kw.update(log_with="tensorboard", project_dir=str(project_dir))
    try:
        return Accelerator(**kw)
    except ValueError as exc:
        if "already been initialized" not in str(exc) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(**kw)


def named_trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def assign_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where) -> None:
    """Copy saved tensors into the trainable parameters; names and shapes must match exactly."""
    params = named_trainable(model)
    if set(params) != set(tensors):
        missing, unexpected = sorted(set(params) - set(tensors))[:5], sorted(set(tensors) - set(params))[:5]
        raise CheckpointError(f"trainable parameters differ from the checkpoint's: missing {missing}, "
                              f"unexpected {unexpected}", path=where)
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != tensors[n].shape:
                raise CheckpointError(f"{n}: shape {tuple(tensors[n].shape)} != {tuple(p.shape)}", path=where)
            p.copy_(tensors[n].to(p.device, p.dtype))


class TrainTask(Callback):
    """What one stage trains. Override the methods marked *required*; the rest have defaults.

    ``model`` is the module whose trainable parameters are optimised, checkpointed and selected.
    ``wrapped`` is set by the trainer to the prepared (possibly DDP-wrapped) :meth:`ddp_module`.
    """

    model: torch.nn.Module
    evaluates: bool = False
    wrapped: torch.nn.Module | None = None

    def ddp_module(self) -> torch.nn.Module | None:
        """The module accelerate prepares (DDP under several processes); ``None``: none."""
        return None

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(named_trainable(self.model).values())

    def steps_in_epoch(self, epoch: int) -> int:  # required
        raise NotImplementedError

    def batches(self, epoch: int, start: int) -> Iterable:  # required: the step batches from ``start`` on
        raise NotImplementedError

    def start_epoch(self, epoch: int, start: int) -> None: ...

    def train_mode(self) -> None:
        """Put the trained modules in training mode (called before every optimiser step)."""
        (self.wrapped if self.wrapped is not None else self.model).train()

    def micro_batches(self, batch, accum: int) -> Sequence:
        """This process's ``accum`` micro-batches of a step batch (contiguous slices by default)."""
        if accum == 1:
            return [batch]
        if torch.is_tensor(batch):
            return list(torch.tensor_split(batch, accum))
        return np.array_split(np.asarray(batch), accum)

    def compute_loss(self, micro) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # required
        raise NotImplementedError

    def after_optimizer_step(self) -> None: ...

    def evaluate(self) -> dict:
        return {}

    def train_row(self, row: dict) -> dict:
        return row

    def generators(self) -> dict[str, torch.Generator]:
        return {}

    def checkpoint_meta(self) -> dict:
        return {}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {CURRENT_PREFIX + n: p.detach() for n, p in named_trainable(self.model).items()}

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], path) -> None:
        assign_trainable(self.model, {k[len(CURRENT_PREFIX):]: v for k, v in tensors.items()
                                      if k.startswith(CURRENT_PREFIX)}, path)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in named_trainable(self.model).items()}

    def restore_snapshot(self, tensors: dict[str, torch.Tensor], path) -> None:
        assign_trainable(self.model, tensors, path)


class Trainer:
    """Drive a :class:`TrainTask` under a :class:`Budget` and :class:`RunSettings`; see the module doc."""

    def __init__(self, task: TrainTask, budget: Budget, run: RunSettings, accelerator=None,
                 fingerprint: dict | None = None, callbacks: Sequence[Callback] = ()):
        self.task, self.budget, self.run = task, budget.validate(), run.validate()
        self.out = Path(run.out_dir) if run.out_dir else None
        self.acc = accelerator if accelerator is not None else make_accelerator(run.device, run.precision, self.out)
        self.rank, self.world, self.is_main = self.acc.process_index, self.acc.num_processes, self.acc.is_main_process
        self.fingerprint = json.loads(json.dumps(fingerprint or {}))
        self.checkpoint_root = self.out / "checkpoints" if self.out else None
        self.selection = BestOnValidation() if task.evaluates and budget.select_metric else None
        self.metrics = MetricsLog(self.out / "metrics.jsonl" if self.out else None)
        self.callbacks = [c for c in (self.selection, task, self.metrics, Progress(run.progress, run.progress_unit))
                          if c is not None] + list(callbacks)
        self.state = {"step": 0, "epoch": 0, "epoch_step": 0, "best_step": 0, "best_epoch": 0, "best_value": None,
                      "evals_since_best": 0, "stopped": False}
        total = sum(task.steps_in_epoch(e) for e in range(budget.epochs))
        self.total_steps = min(total, budget.max_steps) if budget.max_steps else total
        if self.total_steps == 0:
            raise DataError("the training data make no optimiser step (too few examples for one batch)")
        self.params = task.parameters()
        opt = make_optimizer(budget.optim, self.params, self.acc.device)
        self.scheduler = make_scheduler(budget.optim, opt, self.total_steps)
        module = task.ddp_module()
        if module is not None:
            task.wrapped, self.optimizer = self.acc.prepare(module, opt)
        else:
            self.optimizer = self.acc.prepare(opt)
        self.resumed_from = self._restore()

    # ------------------------------------------------------------------ setup

    def _restore(self) -> Path | None:
        run, acc = self.run, self.acc
        path = None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            if run.existing == "restart" and self.is_main:  # --fresh: forget an earlier run in this out_dir
                shutil.rmtree(self.checkpoint_root, ignore_errors=True)
            acc.wait_for_everyone()
            path = ck.latest_checkpoint(self.checkpoint_root)
            if path is not None and run.existing == "refuse":
                raise ConfigError(f"{self.out} already holds a checkpoint; pass --resume to continue it or choose "
                                  "another out_dir")
        if path is None:
            if run.dropout_seed is not None:
                torch.manual_seed(run.dropout_seed)
            self.metrics.restore(self, None)
            acc.wait_for_everyone()
            return None
        saved = ck.load_checkpoint(path, self.rank)
        meta = saved["meta"]
        old, new = meta.get("config", {}), self.fingerprint.get("config", {})
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ConfigError(f"out_dir holds a checkpoint of a different configuration (settings {diff} differ); "
                              "use another out_dir or start over (--fresh)", path=path)
        if meta.get("world_size") != self.world:
            raise ConfigError(f"the checkpoint was written by {meta.get('world_size')} processes; resume with the "
                              f"same number (now {self.world})", path=path)
        if meta.get("data") != self.fingerprint.get("data"):
            raise DataError(f"cannot resume: the {run.data_what} differ from the checkpointed run's; use another "
                            "out_dir or start over", path=path)
        for cb in self.callbacks:
            cb.load_checkpoint_tensors(saved["model"], path)
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(meta["scheduler"])
            self.state = {k: meta[k] for k in STATE_KEYS}
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"the optimiser or loop state does not fit ({exc})", path=path) from None
        ck.set_rng_state(saved["rng"], self.task.generators(), path)
        self.metrics.restore(self, self.state["step"])
        if self.selection is not None and not any(r.get("kind") == "eval" and r["step"] == self.state["best_step"]
                                                  for r in self.metrics.rows):
            raise CheckpointError("metrics.jsonl lacks the evaluation the checkpoint selected; start over (--fresh)",
                                  path=self.metrics.path)
        acc.print(f"resuming from step {self.state['step']} ({path})")
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ the loop

    @property
    def rows(self) -> list[dict]:
        return self.metrics.rows

    def evaluations(self) -> list[dict]:
        return [r for r in self.rows if r.get("kind") == "eval"]

    def fit(self) -> dict:
        """Train to the end of the budget (or early stop); the model ends with the selected weights."""
        st, budget, run, task = self.state, self.budget, self.run, self.task
        if self.acc.log_with:
            self.acc.init_trackers(run.name, config=flat(self.fingerprint.get("config", {})))
        for cb in self.callbacks:
            cb.on_train_begin(self)
        if task.evaluates and not self.evaluations():
            self.evaluate()  # step 0: the untrained model is a candidate and the baseline row
        self.t0, self.steps_run = time.perf_counter(), 0
        while st["epoch"] < budget.epochs and st["step"] < self.total_steps and not st["stopped"]:
            n = task.steps_in_epoch(st["epoch"])
            if n == 0:  # an epoch whose batches were all too small to split
                st["epoch"] += 1
                continue
            task.start_epoch(st["epoch"], st["epoch_step"])
            for batch in task.batches(st["epoch"], st["epoch_step"]):
                epoch_end = self._step(batch, n)
                if epoch_end or st["step"] >= self.total_steps or st["stopped"]:
                    break
        for cb in self.callbacks:
            cb.on_train_end(self)
        if self.acc.log_with:
            self.acc.end_training()
        self.acc.wait_for_everyone()
        return st

    def _step(self, batch, steps_in_epoch: int) -> bool:
        st, budget, run = self.state, self.budget, self.run
        values = self.train_step(batch)
        st["step"] += 1
        st["epoch_step"] += 1
        self.steps_run += 1
        if (run.log_every and (st["step"] % run.log_every == 0 or st["step"] == self.total_steps)) \
                or (run.log_first and st["step"] == 1):
            self._log(values)
        epoch_end = st["epoch_step"] == steps_in_epoch
        if epoch_end:
            if budget.optim.schedule in PER_EPOCH:
                self.scheduler.step()
            st["epoch"] += 1
            st["epoch_step"] = 0
        final = st["step"] == self.total_steps
        if self.task.evaluates and ((not budget.eval_every and epoch_end) or final
                                    or self._due(budget.eval_every, budget.eval_unit, epoch_end)):
            self.evaluate()
        if self.out is not None and run.checkpoint_every and (
                final or st["stopped"] or (run.checkpoint_epoch_end and epoch_end)
                or self._due(run.checkpoint_every, run.checkpoint_unit, epoch_end)):
            self.save_checkpoint()
        for cb in self.callbacks:
            cb.on_step_end(self)
        if epoch_end:
            for cb in self.callbacks:
                cb.on_epoch_end(self)
        return epoch_end

    def _due(self, every: int, unit: str, epoch_end: bool) -> bool:
        if not every:
            return False
        if unit == "epoch":
            return epoch_end and self.state["epoch"] % every == 0
        return self.state["step"] % every == 0

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        """One optimiser step over a step batch; returns this process's loss (and task metrics)."""
        acc, task = self.acc, self.task
        task.train_mode()
        micros = task.micro_batches(batch, self.budget.grad_accum)
        loss_sum = torch.zeros((), device=acc.device)
        extras: dict[str, torch.Tensor] = {}
        for a, micro in enumerate(micros):
            last = a == len(micros) - 1
            sync = contextlib.nullcontext() if last or task.wrapped is None else acc.no_sync(task.wrapped)
            with sync:
                loss, metrics = task.compute_loss(micro)
                acc.backward(loss)
            loss_sum += loss.detach()
            for k, v in metrics.items():
                extras[k] = extras.get(k, 0) + v.detach().float() / len(micros)
        if self.budget.optim.max_grad_norm > 0:
            acc.clip_grad_norm_(self.params, self.budget.optim.max_grad_norm)
        self.optimizer.step()
        if self.budget.optim.schedule not in PER_EPOCH:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        task.after_optimizer_step()
        return {"loss": loss_sum, **extras}

    def _log(self, values: dict[str, torch.Tensor]) -> None:
        names = list(values)
        reduced = self.acc.reduce(torch.stack([values[k].float() for k in names]), reduction="mean")
        row = {"kind": "train", "step": self.state["step"], "epoch": self.state["epoch"],
               **{k: float(v) for k, v in zip(names, reduced)}, "lr": self.optimizer.param_groups[0]["lr"],
               "elapsed_s": round(time.perf_counter() - self.t0, 3)}
        row = self.task.train_row(row)
        for cb in self.callbacks:
            cb.on_log(self, row)

    def evaluate(self) -> dict:
        """Score the task's validation data; callbacks select, save and log."""
        row = {"kind": "eval", "step": self.state["step"], "epoch": self.state["epoch"], **self.task.evaluate()}
        for cb in self.callbacks:
            cb.on_evaluate(self, row)
        self.acc.wait_for_everyone()
        return row

    def save_checkpoint(self) -> Path:
        tensors: dict[str, torch.Tensor] = {}
        for cb in self.callbacks:
            tensors.update(cb.checkpoint_tensors())
        meta = {**self.task.checkpoint_meta(), **self.state, "config": self.fingerprint.get("config", {}),
                "data": self.fingerprint.get("data"), "world_size": self.world,
                "scheduler": self.scheduler.state_dict()}
        path = ck.save_checkpoint(self.checkpoint_root, self.state["step"], tensors, self.optimizer, meta,
                                  accelerator=self.acc, keep=self.run.keep_checkpoints,
                                  generators=self.task.generators())
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)
        return path


__all__ = ["BEST_PREFIX", "CURRENT_PREFIX", "TrainTask", "Trainer", "assign_trainable", "bf16_pays", "make_accelerator",
           "named_trainable", "resolve_precision"]
