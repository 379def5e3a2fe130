"""Callbacks of the training engine: selection with patience, the metrics log, progress.

A callback sees the :class:`~respiramfm.training.engine.Trainer` at fixed points of the loop
(``on_train_begin``, ``on_step_end``, ``on_evaluate``, ``on_epoch_end``, ``on_checkpoint``,
``on_train_end``) and may save tensors with every checkpoint (``checkpoint_tensors`` /
``load_checkpoint_tensors``). The design follows the HF Trainer's callbacks: the loop stays
one piece of code, and what differs between runs (saving the best model, early stopping,
logging, test-only fault injection) is attached to it.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from respiramfm.errors import CheckpointError, DataError
from respiramfm.utils.io import atomic_write_text

BEST_PREFIX = "best::"


class Callback:
    """No-op base: override the events you need."""

    def on_train_begin(self, trainer) -> None: ...

    def on_log(self, trainer, row: dict) -> None: ...

    def on_evaluate(self, trainer, row: dict) -> None: ...

    def on_step_end(self, trainer) -> None: ...

    def on_epoch_end(self, trainer) -> None: ...

    def on_checkpoint(self, trainer, path: Path) -> None: ...

    def on_train_end(self, trainer) -> None: ...

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], path) -> None: ...


def is_better(mode: str, value: float, best: float | None) -> bool:
    """Strict improvement (``last``: every evaluation counts as one)."""
    if best is None or mode == "last":
        return True
    return value > best if mode == "max" else value < best


class BestOnValidation(Callback):
    """Keep the weights of the best validation evaluation; stop after ``patience`` without improvement.

    Reads ``budget.select_metric`` of each evaluation row, marks the row ``improved``, keeps a
    copy of the task's weights (:meth:`TrainTask.snapshot`) and, at the end of training, puts
    the best copy back into the model. Its state lives in ``trainer.state`` and the checkpoint.
    """

    def __init__(self):
        self.best: dict[str, torch.Tensor] = {}

    def on_evaluate(self, trainer, row: dict) -> None:
        budget, st = trainer.budget, trainer.state
        value = row.get(budget.select_metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise DataError(f"validation gave no {budget.select_metric} (does a validation task hold both classes? "
                            "select on the loss instead)")
        row["improved"] = better = is_better(budget.select_mode, value, st["best_value"])
        if better:
            st.update(best_step=st["step"], best_epoch=st["epoch"], best_value=value, evals_since_best=0)
            self.best = trainer.task.snapshot()
        else:
            st["evals_since_best"] += 1
            st["stopped"] = bool(budget.patience and st["evals_since_best"] >= budget.patience)

    def on_train_end(self, trainer) -> None:
        if not self.best:
            raise CheckpointError("no validation result recorded; start over (--fresh)", path=trainer.checkpoint_root)
        trainer.task.restore_snapshot(self.best, trainer.checkpoint_root)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {BEST_PREFIX + k: v for k, v in self.best.items()}

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], path) -> None:
        self.best = {k[len(BEST_PREFIX):]: v for k, v in tensors.items() if k.startswith(BEST_PREFIX)}


def flat(d: dict, prefix: str = "") -> dict:
    """Nested dict -> ``a/b`` keys with scalar values (for trackers)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
    return out


class MetricsLog(Callback):
    """``metrics.jsonl`` (always, main process) and accelerate's trackers (TensorBoard when installed)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.rows: list[dict] = []

    def restore(self, trainer, upto: int | None) -> None:
        """Keep the rows of steps <= ``upto`` (``None``: start empty); the rest will be redone."""
        self.rows = []
        if self.path is None:
            return
        if upto is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):  # a line torn by a kill
                    row = json.loads(line)
                    if row["step"] <= upto:
                        self.rows.append(row)
        if trainer.is_main:
            atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))

    def _write(self, trainer, row: dict) -> None:
        self.rows.append(row)
        if self.path is not None and trainer.is_main:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
        if trainer.acc.log_with:
            values = {k: v for k, v in flat(row).items() if isinstance(v, (int, float)) and k != "step"}
            trainer.acc.log(values, step=row["step"])

    def on_log(self, trainer, row: dict) -> None:
        self._write(trainer, row)

    def on_evaluate(self, trainer, row: dict) -> None:
        self._write(trainer, row)


class Progress(Callback):
    """A tqdm bar (main process), or, with bars off, a plain line on stderr at most every ``every_s``."""

    def __init__(self, enabled: bool, unit: str, every_s: float = 10.0):
        self.enabled, self.unit, self.every_s = enabled, unit, every_s
        self.bar = None
        self.last = 0.0

    def on_train_begin(self, trainer) -> None:
        if self.enabled and trainer.is_main:
            total, initial = ((trainer.budget.epochs, trainer.state["epoch"]) if self.unit == "epoch"
                              else (trainer.total_steps, trainer.state["step"]))
            self.bar = tqdm(total=total, initial=initial, desc=trainer.run.name, unit=self.unit, dynamic_ncols=True)
        self.last = time.monotonic()

    def _line(self, trainer, row: dict, force: bool = False) -> None:
        if self.enabled or not trainer.is_main or not (force or time.monotonic() - self.last >= self.every_s):
            return
        self.last = time.monotonic()
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        print(f"{trainer.run.name}: " + " ".join(f"{k}={v}" for k, v in shown.items()), file=sys.stderr, flush=True)

    def on_log(self, trainer, row: dict) -> None:
        if self.bar is not None and "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}")
        self._line(trainer, row)

    def on_evaluate(self, trainer, row: dict) -> None:
        self._line(trainer, row)

    def on_step_end(self, trainer) -> None:
        if self.bar is not None and self.unit == "step":
            self.bar.update(1)
        elif not self.enabled:  # bars off: a line every ``every_s`` even between logged rows
            self._line(trainer, {"step": trainer.state["step"], "of": trainer.total_steps,
                                 "epoch": trainer.state["epoch"]})

    def on_epoch_end(self, trainer) -> None:
        if self.bar is not None and self.unit == "epoch":
            self.bar.update(1)

    def on_train_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
        self._line(trainer, {"step": trainer.state["step"], "epoch": trainer.state["epoch"]}, force=True)


__all__ = ["BEST_PREFIX", "BestOnValidation", "Callback", "MetricsLog", "Progress", "flat", "is_better"]
