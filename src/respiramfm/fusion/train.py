"""Stage 2: fine-tune the fusion model (LoRA + head) on the supervised tasks (``respiramfm finetune``).

The official recipe (REFERENCE §4; ``configs/finetune_official.yaml``): AdamW lr 1e-5,
betas (0.9, 0.95), eps 1e-8, weight decay 0.1, cosine schedule, 20 epochs, batch 4,
seed 420, tasks T1-T4 concatenated. Two official defects are fixed by construction:

* **selection on validation, never test** (defect 3): the data layer drops test rows
  on read (:func:`respiramfm.fusion.data.load_finetune_data`), so neither the training
  batches nor the evaluation that picks the checkpoint can see a test record. The
  saved ``out_dir/model`` is the best evaluation by mean validation AUROC over the
  trained tasks (or validation loss); ``patience`` stops early;
* **the schedule**: the official code built ``CosineAnnealingLR(T_max=10000)`` and
  stepped it once per epoch, so its LR stayed ~1e-5 for all 20 epochs.
  ``optim.schedule=cosine`` (default) anneals per optimiser step from ``lr`` to
  ``min_lr`` over the whole run; ``official`` reproduces the per-epoch stepping.

Speed (see :mod:`respiramfm.fusion.data` and :mod:`respiramfm.fusion.infer`): audio is
projected once, texts are tokenised once, batches are padded to their own longest
sample and grouped by task and length, and each micro-batch runs its shared prompt once.

Several processes: ``accelerate launch --multi_gpu --num_processes N -m respiramfm.cli
finetune ... --set device=cpu`` (DDP over gloo on CPUs). ``batch_size`` is per process
and per accumulation round; one optimiser step consumes ``batch_size x grad_accum x N``
examples, and the trajectory depends only on that product (1 process x batch 4 ==
2 processes x batch 2, up to float summation order).

Outputs in ``out_dir``: ``model/`` (best, ``RespiraMFM.save_pretrained``), ``metrics.jsonl``
(training rows every ``log_every`` steps, ``"kind": "eval"`` rows per validation),
``summary.json``, ``config.yaml``, ``skipped.tsv``, ``checkpoints/`` (LoRA + head, best
weights, optimizer, scheduler, per-process RNG, step; safetensors + JSON). A killed run
started again with the same config resumes and ends bit-identical to an uninterrupted one.
When ``tensorboard`` is installed, the same rows also go to TensorBoard through accelerate's
tracker (``out_dir/finetune``); it is optional, the JSONL is always written.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from respiramfm.config import add_config_arguments, load_config, save_config, to_dict
from respiramfm.errors import CheckpointError, ConfigError, DataError
from respiramfm.utils.io import atomic_write_json, atomic_write_text

FAULT_ENV = "RESPIRAMFM_FAULT_KILL_AFTER_STEP"  # test hook: SIGKILL this process after that optimiser step
from respiramfm.fusion.train_config import (  # noqa: F401  (re-exported)
    RESUME_FREE, SCHEDULES, FinetuneConfig, OptimConfig,
)


@dataclass
class FinetuneResult:
    out_dir: Path
    best_step: int
    best: dict
    last_step: int
    stopped_early: bool
    evals: list[dict]


def _fingerprint(cfg: FinetuneConfig) -> dict:
    d = to_dict(cfg)
    for k in RESUME_FREE:
        d.pop(k, None)
    return d


def _accelerator(cfg: FinetuneConfig, out: Path):
    """An Accelerator for this run (a previous in-process state with other settings is reset)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import is_tensorboard_available

    kw = dict(cpu=cfg.device == "cpu", mixed_precision="bf16" if cfg.precision == "bf16" else "no")
    if is_tensorboard_available():  # optional: JSONL is always written
        kw.update(log_with="tensorboard", project_dir=str(out))
    try:
        return Accelerator(**kw)
    except ValueError as exc:
        if "already been initialized" not in str(exc) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(**kw)


def build_model(cfg: FinetuneConfig, data, device) -> "torch.nn.Module":
    """The fusion model with the frozen projector and the encoder facts of the audio store."""
    from respiramfm.align.projector import Projector, ProjectorConfig, load_projector, read_projector_json
    from respiramfm.fusion.model import EncoderInfo, RespiraMFM, load_configured_backbone

    fcfg = copy.deepcopy(cfg.model)
    meta = data.audio_meta
    if meta:
        fcfg.encoder = EncoderInfo(name=str(meta.get("encoder", "")), checkpoint=str(meta.get("checkpoint") or ""),
                                   weights_hash=str(meta.get("weights_hash", "")),
                                   out_dim=int(meta.get("dim", data.train.audio.shape[-1])),
                                   frontend=dict(meta.get("frontend") or {}), tokens=meta.get("kind") == "tokens")
    backbone = load_configured_backbone(fcfg)
    if cfg.projector:
        projector, _ = load_projector(cfg.projector)
        provenance = read_projector_json(cfg.projector).get("provenance", {})
    else:  # text-only: an identity-shaped stand-in that never sees audio
        projector = Projector(ProjectorConfig(kind="linear", in_dim=fcfg.encoder.out_dim, out_dim=backbone.hidden_size,
                                              final="none"))
        provenance = {"note": "text-only model: no audio projector was trained"}
    from respiramfm.data.tasks import all_tasks

    tasks = {**all_tasks(), **data.tasks}  # zero-shot tasks too: the saved model can be asked about them
    model = RespiraMFM(fcfg, projector, backbone=backbone, projector_provenance=provenance, tasks=tasks)
    return model.to(device)


class _Step(torch.nn.Module):
    """What DDP wraps: example indices in, logits out (the cached inputs live outside autograd)."""

    def __init__(self, model, prep):
        super().__init__()
        self.model = model
        self.prep = prep

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        from respiramfm.fusion.data import resolved_items
        from respiramfm.fusion.infer import shared_prefix_logits

        return shared_prefix_logits(self.model, resolved_items(self.model, self.prep, idx.tolist()))


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


def make_optimizer(cfg: FinetuneConfig, params, total_steps: int):
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.schedule == "official":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o.t_max, eta_min=o.min_lr)
    elif o.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o, total_steps))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, sched


def _named_trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _assign(model, tensors: dict[str, torch.Tensor], where) -> None:
    """Copy saved tensors into the trainable parameters; names and shapes must match exactly."""
    params = _named_trainable(model)
    if set(params) != set(tensors):
        missing, unexpected = sorted(set(params) - set(tensors))[:5], sorted(set(tensors) - set(params))[:5]
        raise CheckpointError(f"trainable parameters differ from the checkpoint's: missing {missing}, "
                              f"unexpected {unexpected}", path=where)
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != tensors[n].shape:
                raise CheckpointError(f"{n}: shape {tuple(tensors[n].shape)} != {tuple(p.shape)}", path=where)
            p.copy_(tensors[n].to(p.device, p.dtype))


def _read_rows(path: Path, upto: int) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                row = json.loads(line)
                if row["step"] <= upto:
                    rows.append(row)
    return rows


def _data_fingerprint(cfg: FinetuneConfig, data) -> str:
    fingerprint = data.fingerprint()
    if cfg.projector:
        from respiramfm.align.projector import WEIGHTS_NAME
        from respiramfm.utils.io import sha256_file

        pdir = Path(cfg.projector)
        pdir = pdir.parent if pdir.suffix in (".safetensors", ".json") else pdir
        fingerprint += "/projector:" + sha256_file(pdir / WEIGHTS_NAME)
    return fingerprint


def finetune(cfg: FinetuneConfig, data=None, model=None) -> FinetuneResult:
    """Run (or resume) stage-2 training; ``data`` defaults to loading the configured manifests.

    ``model`` (optional) is a :class:`RespiraMFM` to train in place instead of building one
    from ``cfg.model``; it ends holding the selected (best) weights.
    """
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _Trainer(cfg, data, model).run()
    finally:
        torch.set_num_threads(threads)


class _Trainer:
    """One run: setup (or restore), the step loop, validation-based selection, checkpoints."""

    def __init__(self, cfg: FinetuneConfig, data, model):
        from respiramfm.encoders import pretrain_ckpt as ck
        from respiramfm.fusion.data import load_finetune_data, plan_epoch, prepare_examples

        self.cfg, self.ck = cfg, ck
        self.out = out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.acc = acc = _accelerator(cfg, out)
        self.rank, self.world, self.main = acc.process_index, acc.num_processes, acc.is_main_process
        if data is None:
            data = load_finetune_data(cfg.manifests, cfg.audio_store, cfg.tasks, cfg.task_files, cfg.val_fraction,
                                      need_audio=cfg.model.mode != "text_only")
        self.data = data
        torch.manual_seed(cfg.seed)  # identical LoRA/head initialisation on every process
        self.model = build_model(cfg, data, acc.device) if model is None else model.to(acc.device)
        self.fingerprint = _data_fingerprint(cfg, data)
        self.train_prep = prepare_examples(self.model, data.train)
        self.val_prep = prepare_examples(self.model, data.val)
        step_size = cfg.batch_size * cfg.grad_accum * self.world
        self.plans = [plan_epoch(self.train_prep.tasks, self.train_prep.lengths, step_size, cfg.mixing, cfg.seed, e,
                                 cfg.group_by_task, cfg.group_by_length, min_size=cfg.grad_accum * self.world)
                      for e in range(cfg.epochs)]
        total = sum(len(p) for p in self.plans)
        self.total = min(total, cfg.max_steps) if cfg.max_steps else total
        if self.total == 0:
            raise DataError(f"{len(self.train_prep)} training examples make no optimiser step of {step_size}")
        opt, self.sched = make_optimizer(cfg, self.model.trainable_parameters(), self.total)
        self.wrapped, self.opt = acc.prepare(_Step(self.model, self.train_prep), opt)
        self.ckpt_root, self.metrics_path = out / "checkpoints", out / "metrics.jsonl"
        self.st = {"step": 0, "epoch": 0, "epoch_step": 0, "best_step": 0, "best_value": None,
                   "evals_since_best": 0, "stopped": False}
        self.best: dict[str, torch.Tensor] = {}
        self.rows: list[dict] = []
        self._restore()
        self.trackers = bool(acc.log_with)
        if self.trackers:
            acc.init_trackers("finetune", config=_flat(to_dict(cfg)))
        if self.main:
            save_config(cfg, out / "config.yaml")
            atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))
        acc.wait_for_everyone()

    def _restore(self) -> None:
        cfg, acc = self.cfg, self.acc
        if not cfg.resume and self.main:  # --fresh: forget an earlier run in this out_dir
            import shutil

            shutil.rmtree(self.ckpt_root, ignore_errors=True)
            self.metrics_path.unlink(missing_ok=True)
        acc.wait_for_everyone()
        ckpt_dir = self.ck.latest_checkpoint(self.ckpt_root)
        if ckpt_dir is None:
            torch.manual_seed(cfg.seed * 7919 + 1 + self.rank)  # dropout stream, per process
            return
        saved = self.ck.load_checkpoint(ckpt_dir, self.rank)
        meta = saved["meta"]
        if meta.get("config") != json.loads(json.dumps(_fingerprint(cfg))):
            raise ConfigError("out_dir holds a checkpoint of a different configuration; use another out_dir or "
                              "--fresh", path=ckpt_dir)
        if meta.get("data") != self.fingerprint or meta.get("world_size") != self.world:
            raise DataError("the checkpoint was trained on other data or another number of processes; use another "
                            "out_dir or --fresh", path=ckpt_dir)
        _assign(self.model, {k[5:]: v for k, v in saved["model"].items() if k.startswith("cur::")}, ckpt_dir)
        self.best = {k[6:]: v for k, v in saved["model"].items() if k.startswith("best::")}
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(meta["scheduler"])
        self.st = {k: meta[k] for k in self.st}
        self.ck.set_rng_state(saved["rng"])
        self.rows = _read_rows(self.metrics_path, self.st["step"])
        acc.print(f"resuming from step {self.st['step']} ({ckpt_dir})")

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.main:
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
        if self.trackers:
            flat = {k: v for k, v in _flat(row).items() if isinstance(v, (int, float)) and k != "step"}
            self.acc.log(flat, step=row["step"])

    def validate(self) -> None:
        """Score the validation set; keep the weights (and save the model) when it improved."""
        from respiramfm.fusion.infer import validation_metrics

        cfg, st = self.cfg, self.st
        with self.acc.autocast():
            res = validation_metrics(self.model, self.val_prep, self.acc, cfg.eval_batch_size)
        value = res["val_mean_auroc"] if cfg.select_metric == "auroc" else res["val_loss"]
        if value is None:
            raise DataError("no validation task holds both classes; use select_metric=loss")
        better = st["best_value"] is None or (value > st["best_value"] if cfg.select_metric == "auroc"
                                              else value < st["best_value"])
        row = {"kind": "eval", "step": st["step"], "epoch": st["epoch"], **res, "improved": better}
        self.log(row)
        if better:
            st.update(best_step=st["step"], best_value=value, evals_since_best=0)
            self.best = {n: p.detach().cpu().clone() for n, p in _named_trainable(self.model).items()}
            if self.main:
                self.model.save_pretrained(self.out / "model", extra=_training_info(cfg, self.data, row))
        else:
            st["evals_since_best"] += 1
            st["stopped"] = bool(cfg.patience and st["evals_since_best"] >= cfg.patience)
        self.acc.wait_for_everyone()

    def checkpoint(self) -> None:
        tensors = {f"cur::{n}": p.detach() for n, p in _named_trainable(self.model).items()}
        tensors.update({f"best::{n}": t for n, t in self.best.items()})
        meta = {**self.st, "config": _fingerprint(self.cfg), "data": self.fingerprint, "world_size": self.world,
                "scheduler": self.sched.state_dict()}
        self.ck.save_checkpoint(self.ckpt_root, self.st["step"], tensors, self.opt, meta, accelerator=self.acc, keep=2)

    def step(self, batch: np.ndarray) -> torch.Tensor:
        """One optimiser step over a step batch; returns this process's share of the mean loss."""
        from respiramfm.fusion.data import micro_batches

        cfg, acc = self.cfg, self.acc
        scale = self.world / len(batch)  # DDP averages over processes: the step's loss is a mean over `batch`
        shown = torch.zeros((), device=acc.device)
        for a, micro in enumerate(micro_batches(batch, self.world, cfg.grad_accum, self.rank)):
            sync = contextlib.nullcontext() if a == cfg.grad_accum - 1 else acc.no_sync(self.wrapped)
            with sync:
                logits = self.wrapped(torch.as_tensor(micro))
                labels = self.train_prep.labels[micro].to(logits.device)
                loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum") * scale
                acc.backward(loss)
            shown += loss.detach()
        if cfg.optim.max_grad_norm > 0:
            acc.clip_grad_norm_(self.model.trainable_parameters(), cfg.optim.max_grad_norm)
        self.opt.step()
        if cfg.optim.schedule != "official":
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return shown

    def run(self) -> FinetuneResult:
        from tqdm.auto import tqdm

        cfg, st, acc = self.cfg, self.st, self.acc
        if st["best_value"] is None and not any(r.get("kind") == "eval" for r in self.rows):
            self.validate()  # step 0: the untrained model is a candidate and the baseline row
        fault = int(os.environ.get(FAULT_ENV, "0") or 0)
        bar = tqdm(total=self.total, initial=st["step"], desc="finetune", unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.main))
        t0, steps_run = time.perf_counter(), 0
        while st["epoch"] < cfg.epochs and st["step"] < self.total and not st["stopped"]:
            plan = self.plans[st["epoch"]]
            if not plan:  # an epoch whose step batches were all too small to split
                st["epoch"] += 1
                continue
            self.wrapped.train()
            shown = self.step(plan[st["epoch_step"]])
            st["step"] += 1
            st["epoch_step"] += 1
            steps_run += 1
            bar.update(1)
            if st["step"] % cfg.log_every == 0 or st["step"] == self.total:
                loss = float(acc.reduce(shown, reduction="sum")) / self.world
                self.log({"kind": "train", "step": st["step"], "epoch": st["epoch"], "loss": loss,
                          "lr": self.opt.param_groups[0]["lr"], "elapsed_s": round(time.perf_counter() - t0, 3)})
                bar.set_postfix(loss=f"{loss:.4f}")
            epoch_end = st["epoch_step"] == len(plan)
            if epoch_end:
                if cfg.optim.schedule == "official":
                    self.sched.step()
                st["epoch"] += 1
                st["epoch_step"] = 0
            if (cfg.eval_every and st["step"] % cfg.eval_every == 0) or (not cfg.eval_every and epoch_end) \
                    or st["step"] == self.total:
                self.validate()
            if st["step"] % cfg.checkpoint_every == 0 or epoch_end or st["step"] == self.total or st["stopped"]:
                self.checkpoint()
            if fault and st["step"] == fault:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        return self._finish(steps_run, time.perf_counter() - t0)

    def _finish(self, steps_run: int, seconds: float) -> FinetuneResult:
        if not self.best:
            raise CheckpointError("no validation result recorded; start over with --fresh", path=self.ckpt_root)
        _assign(self.model, self.best, self.ckpt_root)
        evals = [r for r in self.rows if r.get("kind") == "eval"]
        best_row = next(r for r in reversed(evals) if r["step"] == self.st["best_step"])
        if self.main:
            self.model.save_pretrained(self.out / "model", extra=_training_info(self.cfg, self.data, best_row))
            _write_reports(self.out, self.cfg, self.data, self.st, best_row, steps_run, seconds, self.total)
        if self.trackers:
            self.acc.end_training()
        self.acc.wait_for_everyone()
        return FinetuneResult(self.out, self.st["best_step"], best_row, self.st["step"], self.st["stopped"], evals)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
    return out


def _training_info(cfg: FinetuneConfig, data, res: dict) -> dict:
    return {"stage": "finetune", "selected_on": "validation", "select_metric": cfg.select_metric,
            "step": res["step"], "epoch": res["epoch"], "tasks": sorted(data.tasks), "mixing": cfg.mixing,
            "seed": cfg.seed, "simulated": data.simulated, "val_source": data.val_source,
            "val": {k: res.get(k) for k in ("val_loss", "val_auroc", "val_mean_auroc", "val_accuracy", "n_val")}}


def _write_reports(out: Path, cfg, data, st: dict, best_row: dict, steps_run: int, seconds: float, total: int) -> None:
    counts: dict[str, int] = {}
    for s in data.skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    atomic_write_text(out / "skipped.tsv", "record_id\tsplit\ttask\treason\n" + "".join(
        f"{s['record_id']}\t{s['split']}\t{s.get('task', '')}\t{s['reason']}\n" for s in data.skipped))
    per_task = {t: {"train": sum(e.task == t for e in data.train.examples),
                    "val": sum(e.task == t for e in data.val.examples)} for t in sorted(data.tasks)}
    atomic_write_json(out / "summary.json", {
        "best_step": st["best_step"], "select_metric": cfg.select_metric, "best": best_row, "last_step": st["step"],
        "total_steps": total, "stopped_early": st["stopped"], "examples": per_task, "skipped": counts,
        "val_source": data.val_source, "simulated": data.simulated, "steps_this_run": steps_run,
        "train_seconds_this_run": round(seconds, 3), "model_dir": str(out / "model"),
        "note": "checkpoint selected on validation only; test records were never loaded"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML config (configs/finetune.yaml, configs/finetune_official.yaml)",
                         "--set batch_size=8 --set model.lora.r=8 --set tasks=[T1,T4]")
    parser.add_argument("--fresh", action="store_true", help="ignore (and replace) checkpoints already in out_dir")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    if args.fresh:
        cfg.resume = False
    result = finetune(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        b = result.best
        print(json.dumps({"out_dir": str(result.out_dir), "model": str(result.out_dir / "model"),
                          "best_step": result.best_step, "val_mean_auroc": b.get("val_mean_auroc"),
                          "val_loss": b.get("val_loss"), "last_step": result.last_step,
                          "stopped_early": result.stopped_early}))
    return 0


__all__ = ["FinetuneConfig", "FinetuneResult", "OptimConfig", "add_arguments", "build_model", "finetune",
           "lr_lambda", "make_optimizer", "run"]
