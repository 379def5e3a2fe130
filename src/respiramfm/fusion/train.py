"""Stage 2: fine-tune the fusion model (LoRA + head) on the supervised tasks (``respiramfm finetune``).

The official recipe (docs/paper.md §4; ``configs/paper/finetune.yaml``, ``--config paper``): AdamW lr 1e-5,
betas (0.9, 0.95), eps 1e-8, weight decay 0.1, cosine schedule, 20 epochs, batch 16 (the
released config says 4), seed 420, tasks T1-T4 concatenated. Two official defects are fixed by construction:

* **selection on validation, never test** (defect 3): the data layer drops test rows
  on read (:func:`respiramfm.fusion.data.load_finetune_data`), so neither the training
  batches nor the evaluation that picks the checkpoint can see a test record. The
  saved ``out_dir/model`` is the best evaluation by mean validation AUROC over the
  trained tasks (or validation loss); ``patience`` stops early;
* **the schedule**: the official code built ``CosineAnnealingLR(T_max=10000)`` and
  stepped it once per epoch, so its LR stayed ~1e-5 for all 20 epochs.
  ``optim.schedule=cosine`` (default) anneals per optimiser step from ``lr`` to
  ``min_lr`` over the whole run; ``official`` reproduces the per-epoch stepping.

The loop, checkpoints, selection, logging and resumption are the shared engine's
(:mod:`respiramfm.training`); this module says what stage 2 trains: audio is projected
once, texts are tokenised once, batches are padded to their own longest sample and grouped
by task and length, and each micro-batch runs its shared prompt once
(:mod:`respiramfm.fusion.data`, :mod:`respiramfm.fusion.infer`).

Several processes: ``accelerate launch --multi_gpu --num_processes N -m respiramfm.cli
finetune ... --set device=cpu`` (DDP over gloo on CPUs). ``batch_size`` is per process
and per accumulation round; one optimiser step consumes ``batch_size x grad_accum x N``
examples, and the trajectory depends only on that product (1 process x batch 4 ==
2 processes x batch 2, up to float summation order).

Outputs in ``out_dir``: ``model/`` (best, ``RespiraMFM.save_pretrained``), ``metrics.jsonl``
(training rows every ``log_every`` steps, ``"kind": "eval"`` rows per validation),
``summary.json``, ``config.yaml``, ``skipped.tsv``, ``checkpoints/`` (the engine's format:
LoRA + head as ``cur::``, best weights as ``best::``, optimizer, scheduler, per-process RNG,
step). A killed run started again with the same config resumes and ends bit-identical to an
uninterrupted one. TensorBoard (``out_dir/finetune``) is written when it is installed.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from respiramfm.align.compat import check_projector
from respiramfm.config import add_config_arguments, load_config, save_config, to_dict
from respiramfm.data.tasks import all_tasks
from respiramfm.errors import ConfigError, DataError
from respiramfm.fusion.data import load_finetune_data, micro_batches, plan_epoch, prepare_examples, resolved_items
from respiramfm.fusion.infer import shared_prefix_logits, validation_metrics
from respiramfm.fusion.train_config import RESUME_FREE, FinetuneConfig, OptimConfig, ThresholdConfig, finetune_budget
from respiramfm.fusion.trunk_cache import TrunkCache
from respiramfm.models.configuration import EncoderInfo, ProjectorConfig
from respiramfm.models.fusion import RespiraMFM, load_configured_backbone
from respiramfm.models.projector import WEIGHTS_NAME, Projector, load_projector, read_projector_json
from respiramfm.training.config import RunSettings
from respiramfm.training.engine import TrainTask, Trainer, make_accelerator
from respiramfm.training.optim import lr_lambda  # noqa: F401  (re-exported)
from respiramfm.utils.io import atomic_write_json, atomic_write_text, csv_row, user_cache_dir
from respiramfm.utils.progress import add_run_flags


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
    if d.get("threshold") == to_dict(ThresholdConfig()):  # the default rule: runs checkpointed before it existed resume
        d.pop("threshold")
    return d


def build_model(cfg: FinetuneConfig, data, device) -> RespiraMFM:
    """The fusion model with the frozen projector and the encoder facts of the audio store.

    The projector must have been aligned with this audio store's encoder and this LLM (same layer
    cut): :func:`respiramfm.align.compat.check_projector` refuses anything else. Its provenance,
    that record included, is carried into the saved model (``config.json``, ``projector.provenance``).
    """
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
        # a projector aligned with another encoder, LLM or layer cut is refused (align/compat.py)
        check_projector(provenance, meta or None, backbone.identity(), backbone.hidden_size, path=cfg.projector)
    else:  # text-only: an identity-shaped stand-in that never sees audio
        projector = Projector(ProjectorConfig(kind="linear", in_dim=fcfg.encoder.out_dim, out_dim=backbone.hidden_size,
                                              final="none"))
        provenance = {"note": "text-only model: no audio projector was trained"}
    tasks = {**all_tasks(), **data.tasks}  # zero-shot tasks too: the saved model can be asked about them
    model = RespiraMFM(fcfg, projector, backbone=backbone, projector_provenance=provenance, tasks=tasks)
    return model.to(device)


class _Step(torch.nn.Module):
    """What DDP wraps: example indices in, logits out (the cached inputs live outside autograd)."""

    def __init__(self, model, prep, trunk: TrunkCache | None = None):
        super().__init__()
        self.model = model
        self.prep = prep
        self.trunk = trunk  # frozen-trunk cache: only the adapted top layers run (fusion/trunk_cache.py)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        resolved = resolved_items(self.model, self.prep, idx.tolist())
        return self.trunk.logits(resolved) if self.trunk is not None else shared_prefix_logits(self.model, resolved)


class FinetuneTask(TrainTask):
    """Stage 2 for the engine: task/length-grouped step batches over cached inputs, CE on the logits."""

    evaluates = True

    def __init__(self, cfg: FinetuneConfig, data, model: RespiraMFM, acc):
        self.cfg, self.data, self.model, self.acc = cfg, data, model, acc
        self.world, self.rank = acc.num_processes, acc.process_index
        self.train_prep = prepare_examples(model, data.train)
        self.val_prep = prepare_examples(model, data.val)
        step_size = cfg.batch_size * cfg.grad_accum * self.world
        self.plans = [plan_epoch(self.train_prep.tasks, self.train_prep.lengths, step_size, cfg.mixing, cfg.seed, e,
                                 cfg.group_by_task, cfg.group_by_length, min_size=cfg.grad_accum * self.world)
                      for e in range(cfg.epochs)]
        if not any(len(p) for p in self.plans):
            raise DataError(f"{len(self.train_prep)} training examples make no optimiser step of {step_size}")
        self._scale = 1.0
        self.trunk = None
        if cfg.trunk_cache:
            if self.world > 1:
                raise ConfigError("trunk_cache runs in one process (one writer per cache store)")
            self.trunk = TrunkCache(model, cfg.trunk_cache_dir or user_cache_dir("trunk_cache"), cfg.accept_eval_trunk,
                                    precision="bf16" if acc.mixed_precision == "bf16" else "fp32")  # training's, keyed
            self.trunk.build(resolved_items(model, self.train_prep, range(len(self.train_prep))), cfg.eval_batch_size)

    def ddp_module(self):
        return _Step(self.model, self.train_prep, self.trunk)

    def parameters(self):
        return list(self.model.trainable_parameters())

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.plans[epoch])

    def batches(self, epoch: int, start: int):
        return self.plans[epoch][start:]

    def micro_batches(self, batch: np.ndarray, accum: int):
        self._scale = self.world / len(batch)  # DDP averages over processes: the step loss is a mean over `batch`
        return micro_batches(batch, self.world, accum, self.rank)  # slice a * world + rank: round a, this process

    def compute_loss(self, micro):
        logits = self.wrapped(torch.as_tensor(micro))
        labels = self.train_prep.labels[micro].to(logits.device)
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum") * self._scale, {}

    def evaluate(self) -> dict:
        with self.acc.autocast():
            return validation_metrics(self.model, self.val_prep, self.acc, self.cfg.eval_batch_size, self.trunk,
                                      threshold=self.cfg.threshold)

    def on_evaluate(self, trainer, row: dict) -> None:
        if row["improved"] and trainer.is_main:
            stamp_model(self.model, self.data, row)
            self.model.save_pretrained(Path(self.cfg.out_dir) / "model", extra=_training_info(self.cfg, self.data, row))


def _tensor_digest(path: Path) -> str:
    """SHA-256 over a safetensors file's tensors (name, dtype, shape, bytes), in name order.

    Not the file's bytes: safetensors writes its metadata header in a per-process order, so the same
    projector saved again (a re-run of `align` resuming its finished run) is a different file.
    """
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _data_fingerprint(cfg: FinetuneConfig, data) -> str:
    fingerprint = data.fingerprint()
    if cfg.projector:
        pdir = Path(cfg.projector)
        pdir = pdir.parent if pdir.suffix in (".safetensors", ".json") else pdir
        fingerprint += "/projector:" + _tensor_digest(pdir / WEIGHTS_NAME)
    return fingerprint


def finetune(cfg: FinetuneConfig, data=None, model=None, callbacks=()) -> FinetuneResult:
    """Run (or resume) stage-2 training; ``data`` defaults to loading the configured manifests.

    ``model`` (optional) is a :class:`RespiraMFM` to train in place instead of building one
    from ``cfg.model``; it ends holding the selected (best) weights. ``callbacks`` are extra
    :class:`respiramfm.training.callbacks.Callback` objects for the engine.
    """
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _finetune(cfg, data, model, callbacks)
    finally:
        torch.set_num_threads(threads)


def _finetune(cfg: FinetuneConfig, data, model, callbacks) -> FinetuneResult:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(cfg.device, cfg.precision, out)  # "auto": bf16 only where it is faster (engine.py)
    if data is None:
        data = load_finetune_data(cfg.manifests, cfg.audio_store, cfg.tasks, cfg.task_files, cfg.val_fraction,
                                  need_audio=cfg.model.mode != "text_only")
    torch.manual_seed(cfg.seed)  # identical LoRA/head initialisation on every process
    model = build_model(cfg, data, acc.device) if model is None else model.to(acc.device)
    task = FinetuneTask(cfg, data, model, acc)
    run = RunSettings(out_dir=str(out), name="finetune", existing="resume" if cfg.resume else "restart",
                      checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, progress=cfg.progress,
                      dropout_seed=cfg.seed * 7919 + 1 + acc.process_index)
    trainer = Trainer(task, finetune_budget(cfg), run, accelerator=acc, callbacks=callbacks,
                      fingerprint={"config": _fingerprint(cfg), "data": _data_fingerprint(cfg, data)})
    if acc.is_main_process:
        save_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()
    st = trainer.fit()
    seconds = time.perf_counter() - t0
    evals = trainer.evaluations()
    best_row = next(r for r in reversed(evals) if r["step"] == st["best_step"])
    if acc.is_main_process:
        stamp_model(model, data, best_row)
        model.save_pretrained(out / "model", extra=_training_info(cfg, data, best_row))
        _write_reports(out, cfg, data, st, best_row, trainer.steps_run, seconds, trainer.total_steps)
    acc.wait_for_everyone()
    return FinetuneResult(out, st["best_step"], best_row, st["step"], st["stopped"], evals)


def stamp_model(model: RespiraMFM, data, row: dict) -> None:
    """Give ``model`` what its directory records beside the weights: the decision thresholds chosen on
    validation in ``row`` (tasks without both classes in validation get none) and what it trained on."""
    from respiramfm.align.compat import recorded

    model.thresholds = {t: dict(v) for t, v in (row.get("thresholds") or {}).items()}
    datasets: dict[str, dict] = {}
    for part in (data.train, data.val):
        for e in part.examples:
            ds = datasets.setdefault(data.tasks[e.task].dataset, {"records": {"train": set(), "val": set()},
                                                                  "patients": {"train": set(), "val": set()}})
            ds["records"][part.split].add(e.record_id)
            ds["patients"][part.split].add(e.patient)
    sim = {t.dataset: bool(t.simulated) or t.dataset.lower().startswith("sim") for t in data.tasks.values()}
    if data.simulated and not any(sim.values()):  # simulated records under unflagged tasks: flag them all
        sim = dict.fromkeys(sim, True)
    trained = sorted(data.tasks)
    model.trained_on = {
        "simulated": bool(data.simulated), "val_source": str(data.val_source), "tasks_trained": trained,
        "tasks_not_trained": sorted(set(model.tasks) - set(trained)),
        "projector": recorded(model.projector_provenance),
        "datasets": {name: {"simulated": bool(sim.get(name)),
                            **{f"{s}_{k}": len(v[k][s]) for k in ("records", "patients") for s in ("train", "val")}}
                     for name, v in sorted(datasets.items())}}


def _training_info(cfg: FinetuneConfig, data, res: dict) -> dict:
    return {"stage": "finetune", "selected_on": "validation", "select_metric": cfg.select_metric,
            "step": res["step"], "epoch": res["epoch"], "tasks": sorted(data.tasks), "mixing": cfg.mixing,
            "seed": cfg.seed, "simulated": data.simulated, "val_source": data.val_source,
            "val": {k: res.get(k) for k in ("val_loss", "val_auroc", "val_mean_auroc", "val_balanced_accuracy", "n_val")}}


def _write_reports(out: Path, cfg, data, st: dict, best_row: dict, steps_run: int, seconds: float, total: int) -> None:
    counts: dict[str, int] = {}
    for s in data.skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    atomic_write_text(out / "skipped.tsv", "record_id\tsplit\ttask\treason\n" + "".join(
        "\t".join(csv_row([s["record_id"], s["split"], s.get("task", ""), s["reason"]])) + "\n"
        for s in data.skipped))
    per_task = {t: {"train": sum(e.task == t for e in data.train.examples),
                    "val": sum(e.task == t for e in data.val.examples)} for t in sorted(data.tasks)}
    atomic_write_json(out / "summary.json", {
        "best_step": st["best_step"], "select_metric": cfg.select_metric, "best": best_row, "last_step": st["step"],
        "total_steps": total, "stopped_early": st["stopped"], "examples": per_task, "skipped": counts,
        "val_source": data.val_source, "simulated": data.simulated, "steps_this_run": steps_run,
        "train_seconds_this_run": round(seconds, 3), "model_dir": str(out / "model"),
        "note": "checkpoint selected on validation only; test records were never loaded"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML config (configs/finetune.yaml, configs/paper/finetune.yaml)",
                         "--set batch_size=8 --set model.lora.r=8 --set tasks=[T1,T4]")
    parser.add_argument("--fresh", action="store_true", help="ignore (and replace) checkpoints already in out_dir")
    add_run_flags(parser)  # --threads N / --no-progress: the same as --set threads=N / --set progress=false


def run(args: argparse.Namespace) -> int:
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    if args.fresh:
        cfg.resume = False
    if args.threads:
        cfg.threads = args.threads
    if args.no_progress:
        cfg.progress = False
    result = finetune(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        b = result.best
        print(json.dumps({"out_dir": str(result.out_dir), "model": str(result.out_dir / "model"),
                          "best_step": result.best_step, "val_mean_auroc": b.get("val_mean_auroc"),
                          "val_loss": b.get("val_loss"), "last_step": result.last_step,
                          "stopped_early": result.stopped_early}))
    return 0


__all__ = ["FinetuneConfig", "FinetuneResult", "FinetuneTask", "OptimConfig", "add_arguments", "build_model",
           "finetune", "lr_lambda", "run"]
