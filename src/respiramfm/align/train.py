"""Stage 1: train the projector by contrastive alignment on cached embeddings (``respiramfm align``).

Both towers are frozen, so a run needs only the cached pairs. They live in memory as
tensors; each epoch draws one permutation from a seeded generator and slices it into
batches (no DataLoader, no per-item collation), and Adam runs fused.

The defaults (identical to ``configs/align.yaml``) keep the official optimisation recipe
(docs/paper.md §4: batch 64, Adam 1e-3, up to 500 epochs, τ initialised at 0.07) with three
changes, the first two measured on the simulated cohort only (docs/settings.md): the signed
projector head (``final=layernorm``), the symmetric CLIP loss with a learnable temperature,
and validation-based selection with early stopping. ``configs/paper/align.yaml``
(``--config paper``) reproduces the release exactly (one-way InfoNCE, LayerNorm+ReLU head,
last epoch kept).

Unlike the official code, a held-out *validation* split (patient-level; never test)
is evaluated every ``eval_every`` epochs — validation loss, audio→text R@1/R@5 over
distinct texts, alignment and uniformity — and the saved projector is the one from the
best validation evaluation (``select_metric``; ``"last"`` reproduces the official
"save the last epoch"). ``patience`` stops early after that many evaluations without
improvement.

Which records: the train/val rows of the datasets of the run's *supervised* tasks (``task_files``
and ``tasks`` say what the run's tasks are; default the built-in T1-T9), or of ``datasets`` when
set; the printed line and ``summary.json`` name them. A manifest with train/val rows of a
dataset that the run uses only for zero-shot tasks is refused (:mod:`respiramfm.data.roles`).
``projector.json`` records the encoder, LLM (with its layer cut) and text space the projector
was aligned with (:mod:`respiramfm.align.compat`); stage 2 refuses another.

Outputs in ``out_dir``: ``projector.safetensors`` + ``projector.json`` (best), ``metrics.jsonl``
(one row per evaluation, epoch 0 = untrained: train_loss, val_loss, r1/r5 with chance_r1/r5,
mrr, median_rank, alignment, uniformity, and scale = exp(logit_scale) = 1/τ), ``summary.json``, ``config.yaml``,
``skipped.tsv``, ``checkpoints/`` (resume state in the engine's format, written at epoch ends:
projector and loss tensors, best projector, optimiser, RNG and shuffle generator) and
``tsne.png``. The loop is the shared engine's (:mod:`respiramfm.training`). Every write is
atomic; a killed run started again with the same config resumes from its checkpoint and
ends with exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from respiramfm.align.compat import projector_compat
from respiramfm.align.data import AlignData, PairSet, load_align_data
from respiramfm.align.figures import tsne_before_after
from respiramfm.align.losses import LOSS_KINDS, ContrastiveLoss
from respiramfm.align.metrics import alignment, retrieval_metrics, uniformity
from respiramfm.config import add_config_arguments, load_config, save_config, to_dict
from respiramfm.data.roles import run_tasks
from respiramfm.errors import CheckpointError, ConfigError
from respiramfm.models.configuration import ProjectorConfig
from respiramfm.models.projector import Projector, build_projector, save_projector
from respiramfm.training.config import Budget, OptimConfig, RunSettings
from respiramfm.training.engine import TrainTask, Trainer
from respiramfm.utils.io import atomic_write_json, atomic_write_text, csv_row
from respiramfm.utils.progress import add_run_flags

SELECT_METRICS = ("val_loss", "r1", "r5", "last")
OPTIMIZERS = ("adam", "adamw")
# Fields that may change between a killed run and its resumption without changing the result's meaning.
_RESUME_FREE = ("out_dir", "device", "threads", "progress", "figure", "epochs", "checkpoint_every", "resume",
                "task_files")
_VAL_ORDER_SEED = 1234567  # fixed validation batching (independent of the training seed)


@dataclass
class AlignConfig:
    audio_store: str = ""            # directory written by `respiramfm embed`
    text_store: str = ""             # directory written by `respiramfm embed-text`
    manifest: str = ""               # records manifest (splits, patients, contexts, diagnoses)
    out_dir: str = "runs/align"
    datasets: list[str] = field(default_factory=list)   # align on these datasets ([] = the supervised tasks')
    task_files: list[str] = field(default_factory=list)  # the run's task definitions ([] = built-in T1-T9)
    tasks: list[str] = field(default_factory=list)       # extra task names of the run (beyond the task files)
    projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(in_dim=None))  # widths from the stores
    loss: str = "clip"               # clip | infonce (official) | dup_aware
    tau: float = 0.07                # fixed temperature (infonce) or initial one (clip, dup_aware)
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"          # adam (official) | adamw
    weight_decay: float = 0.0
    epochs: int = 500
    val_fraction: float = 0.15       # used only when the manifest has no val rows
    seed: int = 0
    eval_every: int = 10             # epochs between validation evaluations (last epoch always)
    select_metric: str = "val_loss"  # val_loss | r1 | r5 | last
    patience: int = 10               # evaluations without improvement before stopping; 0 = never
    checkpoint_every: int = 10       # epochs between resume checkpoints
    resume: bool = True              # continue from the checkpoint in out_dir/checkpoints when present
    device: str = "cpu"
    threads: int = 0                 # torch intra-op CPU threads during the run (0 = leave as is)
    progress: bool = True            # tqdm bar
    figure: bool = True              # t-SNE before/after on the validation set

    def validate(self) -> "AlignConfig":
        if self.loss not in LOSS_KINDS:
            raise ConfigError(f"loss must be one of {LOSS_KINDS}, got {self.loss!r}")
        if self.select_metric not in SELECT_METRICS:
            raise ConfigError(f"select_metric must be one of {SELECT_METRICS}, got {self.select_metric!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("batch_size", "epochs", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.patience < 0 or self.threads < 0 or not self.tau > 0 or not self.lr > 0:
            raise ConfigError("patience and threads must be >= 0, tau and lr > 0")
        self.projector.validate()
        return self


@dataclass
class AlignResult:
    out_dir: Path
    best_epoch: int
    best_metrics: dict
    last_epoch: int
    stopped_early: bool
    metrics: list[dict]
    summary: dict


@torch.no_grad()
def project(model: Projector, audio: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    model.eval()
    return torch.cat([model(audio[i:i + batch_size]) for i in range(0, audio.shape[0], batch_size)])


@torch.no_grad()
def evaluate(model: Projector, loss_fn: ContrastiveLoss, data: PairSet, batch_size: int,
             order: torch.Tensor) -> dict:
    """Validation loss (same loss, fixed random batches) and retrieval/geometry metrics."""
    z = project(model, data.audio)
    total, n = 0.0, len(data)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        ids = data.text_ids.index_select(0, idx) if loss_fn.kind == "dup_aware" else None
        total += float(loss_fn(z.index_select(0, idx), data.text.index_select(0, idx), ids)) * idx.numel()
    out = {"val_loss": total / n}
    out.update(retrieval_metrics(z, data.text, data.text_ids))
    out["alignment"] = alignment(z, data.text)
    out["uniformity"] = uniformity(z)
    return out


def _resume_digest(cfg: AlignConfig) -> dict:
    d = to_dict(cfg)
    for k in _RESUME_FREE:
        d.pop(k, None)
    return d


def align_budget(cfg: AlignConfig) -> Budget:
    """The engine's budget of a stage-1 run: Adam(W) at a constant rate, validation every ``eval_every`` epochs."""
    optim = OptimConfig(optimizer=cfg.optimizer, lr=cfg.lr, betas=[0.9, 0.999], eps=1e-8,
                        weight_decay=cfg.weight_decay, schedule="constant", fused=True)
    key, mode = {"val_loss": ("val_loss", "min"), "r1": ("r1", "max"), "r5": ("r5", "max"),
                 "last": ("val_loss", "last")}[cfg.select_metric]
    return Budget(optim=optim, epochs=cfg.epochs, batch_size=cfg.batch_size, eval_every=cfg.eval_every,
                  eval_unit="epoch", select_metric=key, select_mode=mode, patience=cfg.patience)


class AlignTask(TrainTask):
    """Stage 1 for the engine: a fresh permutation of the cached pairs per epoch, the contrastive loss.

    Each epoch's permutation comes from one seeded generator carried across epochs (and saved in
    every checkpoint); checkpoints fall on epoch ends, so a resumed run draws the same permutations.
    """

    evaluates = True

    def __init__(self, cfg: AlignConfig, model: Projector, loss_fn: ContrastiveLoss, train: PairSet, val: PairSet):
        self.cfg, self.model, self.loss_fn, self.train, self.val = cfg, model, loss_fn, train, val
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.val_order = torch.randperm(len(val), generator=torch.Generator().manual_seed(_VAL_ORDER_SEED)).to(
            val.audio.device)
        self.perm: torch.Tensor | None = None
        self.total: torch.Tensor | None = None  # summed training loss of the current epoch

    def parameters(self):
        return list(self.model.parameters()) + list(self.loss_fn.parameters())

    def steps_in_epoch(self, epoch: int) -> int:
        return -(-len(self.train) // self.cfg.batch_size)

    def start_epoch(self, epoch: int, start: int) -> None:
        if start:
            raise CheckpointError("a stage-1 checkpoint must fall on an epoch end")
        self.perm = torch.randperm(len(self.train), generator=self.gen).to(self.train.audio.device)
        self.total = torch.zeros((), device=self.train.audio.device)

    def batches(self, epoch: int, start: int):
        b = self.cfg.batch_size
        return (self.perm[i:i + b] for i in range(0, len(self.train), b))

    def compute_loss(self, idx):
        data = self.train
        ids = data.text_ids.index_select(0, idx) if self.loss_fn.kind == "dup_aware" else None
        loss = self.loss_fn(self.model(data.audio.index_select(0, idx)), data.text.index_select(0, idx), ids)
        self.total += loss.detach() * idx.numel()
        return loss, {}

    def after_optimizer_step(self) -> None:
        self.loss_fn.clamp_()

    def evaluate(self) -> dict:
        train_loss = None if self.total is None else float(self.total) / len(self.train)
        return dict(train_loss=train_loss, scale=self.loss_fn.current_scale(),
                    **evaluate(self.model, self.loss_fn, self.val, self.cfg.batch_size, self.val_order))

    def generators(self) -> dict[str, torch.Generator]:
        return {"shuffle": self.gen}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"loss.{k}": v for k, v in self.loss_fn.state_dict().items()})
        return out

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], path) -> None:
        for name, module in (("model", self.model), ("loss", self.loss_fn)):
            part = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            expected = module.state_dict()
            if set(part) != set(expected) or any(part[k].shape != expected[k].shape for k in part):
                raise CheckpointError(f"{name} tensors do not match the configured model "
                                      f"(have {sorted(part)}, expected {sorted(expected)})", path=path)
            module.load_state_dict(part, strict=True)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore_snapshot(self, tensors: dict[str, torch.Tensor], path) -> None:
        if set(tensors) != set(self.model.state_dict()):
            raise CheckpointError("best-projector tensors do not match the configured model", path=path)
        self.model.load_state_dict(tensors, strict=True)


def train_align(cfg: AlignConfig, data: AlignData | None = None, callbacks=()) -> AlignResult:
    """Run (or resume) stage-1 training; ``data`` defaults to loading the configured stores.

    ``cfg.threads`` caps torch's CPU threads for the run only (the caller's setting is
    restored): small projectors on a busy machine run several times faster on one thread
    than with OpenMP workers competing for cores.
    """
    cfg.validate()
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train_align(cfg, data, callbacks)
    finally:
        torch.set_num_threads(previous_threads)


def _train_align(cfg: AlignConfig, data: AlignData | None, callbacks) -> AlignResult:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("stage-1 training runs in one process (minutes on cached embeddings); launch it without "
                          "torchrun/accelerate. ContrastiveLoss itself supports gather-with-grad for multi-process use")
    if data is None:
        data = load_align_data(cfg.manifest, cfg.audio_store, cfg.text_store, cfg.val_fraction, cfg.datasets,
                               run_tasks(cfg.task_files, cfg.tasks))
    pcfg = ProjectorConfig(**to_dict(cfg.projector))
    if pcfg.out_dim is None:
        pcfg.out_dim = data.text_dim
    if pcfg.in_dim is None:
        pcfg.in_dim = data.audio_dim
    if pcfg.out_dim != data.text_dim or pcfg.in_dim != data.audio_dim:
        raise ConfigError(f"projector maps {pcfg.in_dim}->{pcfg.out_dim} but the data pairs "
                          f"{data.audio_dim}-d audio with {data.text_dim}-d text")
    device = torch.device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, val = data.train.to(device), data.val.to(device)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):  # never disturb the caller's global RNG
        torch.manual_seed(cfg.seed)
        model = build_projector(pcfg).to(device)
        loss_fn = ContrastiveLoss(cfg.loss, cfg.tau).to(device)
        task = AlignTask(cfg, model, loss_fn, train, val)
        run = RunSettings(out_dir=str(out), name="align", device="cpu" if device.type == "cpu" else "auto",
                          existing="resume" if cfg.resume else "restart", checkpoint_every=cfg.checkpoint_every,
                          checkpoint_unit="epoch", checkpoint_epoch_end=False, progress=cfg.progress,
                          progress_unit="epoch")
        trainer = Trainer(task, align_budget(cfg), run,
                          fingerprint={"config": _resume_digest(cfg), "data": data.fingerprint()},
                          callbacks=callbacks)
        start_epoch = trainer.state["epoch"]
        t0 = time.perf_counter()
        st = trainer.fit()
        train_seconds = time.perf_counter() - t0
    return _finish(cfg, data, model, trainer.evaluations(), st, out, train_seconds, st["epoch"] - start_epoch)


def _finish(cfg: AlignConfig, data: AlignData, model: Projector, rows: list[dict], st: dict, out: Path,
            train_seconds: float, epochs_run: int) -> AlignResult:
    """Write the best projector, the summary, the resolved config, skipped.tsv and the figure."""
    best_row = next(r for r in rows if r["epoch"] == st["best_epoch"])
    provenance = {
        "stage": "align", "loss": cfg.loss, "tau": cfg.tau, "best_epoch": st["best_epoch"],
        "select_metric": cfg.select_metric, "seed": cfg.seed, "simulated": data.simulated,
        "text_space": data.text_meta.get("space"),
        "text_model": data.text_meta.get("model", data.text_meta.get("backbone")),
        "text_store_key": data.text_meta.get("key"), "text_max_tokens": data.text_meta.get("max_tokens"),
        "audio_encoder": data.audio_meta.get("encoder"), "audio_weights_hash": data.audio_meta.get("weights_hash"),
        "audio_frontend_key": data.audio_meta.get("frontend_key"),
        "datasets": list(data.datasets), "datasets_from": data.datasets_from,
        "compat": projector_compat(data.audio_meta, data.text_meta),
    }
    save_projector(model.cpu(), out, provenance)
    counts: dict[str, int] = {}
    for s in data.skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    atomic_write_text(out / "skipped.tsv", "record_id\tsplit\treason\n" + "".join(
        "\t".join(csv_row([s["record_id"], s["split"], s["reason"]])) + "\n" for s in data.skipped))
    summary = {
        "best_epoch": st["best_epoch"], "select_metric": cfg.select_metric, "best": best_row,
        "last_epoch": st["epoch"], "stopped_early": st["stopped"], "n_train": len(data.train), "n_val": len(data.val),
        "val_source": data.val_source, "datasets": list(data.datasets), "datasets_from": data.datasets_from,
        "skipped": counts, "simulated": data.simulated,
        "projector_parameters": model.num_parameters(), "provenance": provenance,
        "epochs_this_run": epochs_run, "train_seconds_this_run": round(train_seconds, 3),
    }
    if cfg.figure:
        summary["figure"] = _figure(data, model, out / "tsne.png", cfg.seed, cfg.threads or None)
    save_config(cfg, out / "config.yaml")
    atomic_write_json(out / "summary.json", summary)
    measured = [{k: v for k, v in r.items() if k != "improved"} for r in rows]  # the selection's mark apart
    return AlignResult(out, st["best_epoch"], best_row, st["epoch"], st["stopped"], measured, summary)


def _figure(data: AlignData, model: Projector, path: Path, seed: int, threads: int | None) -> dict | None:
    """t-SNE before/after on validation rows (plus training rows when validation is too small to show)."""
    parts = [data.val] if len(data.val) >= 50 else [data.train, data.val]
    audio = torch.cat([p.audio.cpu() for p in parts])
    if audio.shape[0] < 5:
        return None
    labels = [d for p in parts for d in p.diagnoses]
    rows = "validation" if len(parts) == 1 else "training + validation"
    scores = tsne_before_after(audio.numpy(), project(model, audio).numpy(), labels, path, data.simulated, seed=seed,
                               title=f"t-SNE of {rows} audio embeddings, coloured by diagnosis", threads=threads)
    return dict(scores, rows=rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML config (e.g. configs/align.yaml); defaults to the built-in recipe",
                         "--set loss=infonce --set projector.final=official")
    parser.add_argument("--fresh", action="store_true", help="ignore (and replace) a checkpoint already in out_dir")
    add_run_flags(parser)  # --threads N / --no-progress: the same as --set threads=N / --set progress=false


def run(args: argparse.Namespace) -> int:
    cfg = load_config(AlignConfig, args.config, args.overrides)
    if args.fresh:
        cfg.resume = False
    if args.threads:
        cfg.threads = args.threads
    if args.no_progress:
        cfg.progress = False
    result = train_align(cfg)
    b = result.best_metrics
    print(json.dumps({"out_dir": str(result.out_dir), "best_epoch": result.best_epoch, "val_loss": b["val_loss"],
                      "r1": b["r1"], "r5": b["r5"], "chance_r1": b["chance_r1"], "chance_r5": b["chance_r5"],
                      "last_epoch": result.last_epoch, "stopped_early": result.stopped_early,
                      "datasets": result.summary["datasets"], "datasets_from": result.summary["datasets_from"]}))
    return 0
