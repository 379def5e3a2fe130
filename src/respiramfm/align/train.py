"""Stage 1: train the projector by contrastive alignment on cached embeddings (``respiramfm align``).

Both towers are frozen, so a run needs only the cached pairs. They live in memory as
tensors; each epoch draws one permutation from a seeded generator and slices it into
batches (no DataLoader, no per-item collation), and Adam runs fused.

The defaults (identical to ``configs/align.yaml``) keep the official optimisation recipe
(REFERENCE §4: batch 64, Adam 1e-3, up to 500 epochs, τ initialised at 0.07) with three
changes measured on the simulated cohort: the signed projector head (``final=layernorm``),
the symmetric CLIP loss with a learnable temperature, and validation-based selection with
early stopping. ``configs/align_official.yaml`` reproduces the release exactly (one-way
InfoNCE, LayerNorm+ReLU head, last epoch kept).

Unlike the official code, a held-out *validation* split (patient-level; never test)
is evaluated every ``eval_every`` epochs — validation loss, audio→text R@1/R@5 over
distinct texts, alignment and uniformity — and the saved projector is the one from the
best validation evaluation (``select_metric``; ``"last"`` reproduces the official
"save the last epoch"). ``patience`` stops early after that many evaluations without
improvement.

Outputs in ``out_dir``: ``projector.safetensors`` + ``projector.json`` (best), ``metrics.jsonl``
(one row per evaluation, epoch 0 = untrained: train_loss, val_loss, r1/r5 with chance_r1/r5,
mrr, median_rank, alignment, uniformity, and scale = exp(logit_scale) = 1/τ), ``summary.json``, ``config.yaml``,
``skipped.tsv``, ``checkpoint.safetensors`` (resume state) and ``tsne.png``. Every write is
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

from respiramfm.align.checkpoint import load_checkpoint, restore, save_checkpoint
from respiramfm.align.data import AlignData, PairSet, load_align_data
from respiramfm.align.losses import LOSS_KINDS, ContrastiveLoss
from respiramfm.align.metrics import alignment, retrieval_metrics, uniformity
from respiramfm.align.projector import Projector, ProjectorConfig, build_projector, save_projector
from respiramfm.config import add_config_arguments, load_config, save_config, to_dict
from respiramfm.errors import CheckpointError, ConfigError, DataError
from respiramfm.utils.io import atomic_write_json, atomic_write_text

SELECT_METRICS = ("val_loss", "r1", "r5", "last")
OPTIMIZERS = ("adam", "adamw")
# Fields that may change between a killed run and its resumption without changing the result's meaning.
_RESUME_FREE = ("out_dir", "device", "threads", "progress", "figure", "epochs", "checkpoint_every", "resume")
_VAL_ORDER_SEED = 1234567  # fixed validation batching (independent of the training seed)


@dataclass
class AlignConfig:
    audio_store: str = ""            # directory written by `respiramfm embed`
    text_store: str = ""             # directory written by `respiramfm embed-text`
    manifest: str = ""               # records manifest (splits, patients, contexts, diagnoses)
    out_dir: str = "runs/align"
    datasets: list[str] = field(default_factory=list)   # restrict to these datasets ([] = all)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
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
    resume: bool = True              # continue from out_dir/checkpoint.safetensors when present
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


def make_optimizer(cfg: AlignConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """Adam/AdamW, fused where torch supports it on the device (same maths, one kernel per step)."""
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    kw = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if device.type in ("cpu", "cuda"):
        kw["fused"] = True
    return cls(params, **kw)


def train_epoch(model: Projector, loss_fn: ContrastiveLoss, opt: torch.optim.Optimizer, data: PairSet,
                batch_size: int, gen: torch.Generator) -> float:
    """One pass over a fresh permutation; returns the per-pair mean training loss."""
    model.train()
    n = len(data)
    perm = torch.randperm(n, generator=gen).to(data.audio.device)
    need_ids = loss_fn.kind == "dup_aware"
    total = torch.zeros((), device=data.audio.device)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        ids = data.text_ids.index_select(0, idx) if need_ids else None
        loss = loss_fn(model(data.audio.index_select(0, idx)), data.text.index_select(0, idx), ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_fn.clamp_()
        total += loss.detach() * idx.numel()
    return float(total) / n


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


def _improved(metric: str, value: float, best: float | None) -> bool:
    if best is None or metric == "last":
        return True
    return value < best if metric == "val_loss" else value > best


def _resume_digest(cfg: AlignConfig) -> dict:
    d = to_dict(cfg)
    for k in _RESUME_FREE:
        d.pop(k, None)
    return d


def _read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def _write_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def train_align(cfg: AlignConfig, data: AlignData | None = None) -> AlignResult:
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
        return _train_align(cfg, data)
    finally:
        torch.set_num_threads(previous_threads)


def _train_align(cfg: AlignConfig, data: AlignData | None) -> AlignResult:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("stage-1 training runs in one process (minutes on cached embeddings); launch it without "
                          "torchrun/accelerate. ContrastiveLoss itself supports gather-with-grad for multi-process use")
    if data is None:
        data = load_align_data(cfg.manifest, cfg.audio_store, cfg.text_store, cfg.val_fraction, cfg.datasets)
    pcfg = ProjectorConfig(**to_dict(cfg.projector))
    if pcfg.out_dim is None:
        pcfg.out_dim = data.text_dim
    if pcfg.out_dim != data.text_dim or pcfg.in_dim != data.audio_dim:
        raise ConfigError(f"projector maps {pcfg.in_dim}->{pcfg.out_dim} but the data pairs "
                          f"{data.audio_dim}-d audio with {data.text_dim}-d text")
    device = torch.device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / "checkpoint.safetensors", out / "metrics.jsonl"
    train, val = data.train.to(device), data.val.to(device)
    fingerprint = data.fingerprint()
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):  # never disturb the caller's global RNG
        torch.manual_seed(cfg.seed)
        model = build_projector(pcfg).to(device)
        loss_fn = ContrastiveLoss(cfg.loss, cfg.tau).to(device)
        opt = make_optimizer(cfg, list(model.parameters()) + list(loss_fn.parameters()), device)
        gen = torch.Generator().manual_seed(cfg.seed)
        val_order = torch.randperm(len(val), generator=torch.Generator().manual_seed(_VAL_ORDER_SEED)).to(device)
        st = {"epoch": 0, "best_epoch": 0, "best_value": None, "evals_since_best": 0, "stopped": False}
        if ckpt_path.exists() and cfg.resume:
            groups, doc = load_checkpoint(ckpt_path)
            if doc.get("config") != _resume_digest(cfg):
                raise ConfigError("out_dir holds a checkpoint of a different configuration; use another out_dir "
                                  "or start over with --fresh", path=ckpt_path)
            if doc.get("data_fingerprint") != fingerprint:
                raise DataError("the data differ from those the checkpoint was trained on; use another out_dir "
                                "or start over with --fresh", path=ckpt_path)
            best_state = restore(ckpt_path, groups, doc, model=model, loss_fn=loss_fn, opt=opt, shuffle_gen=gen)
            st = {k: doc[k] for k in st}
            rows = _read_metrics(metrics_path, st["epoch"])
            if not {0, st["best_epoch"]} <= {r["epoch"] for r in rows}:
                raise CheckpointError("metrics.jsonl lacks rows the checkpoint refers to; start over with --fresh",
                                      path=metrics_path)
        else:
            for stale in (ckpt_path, metrics_path):
                stale.unlink(missing_ok=True)
            rows = [dict(epoch=0, train_loss=None, scale=loss_fn.current_scale(),
                         **evaluate(model, loss_fn, val, cfg.batch_size, val_order))]
            st["best_value"] = None if cfg.select_metric == "last" else rows[0][cfg.select_metric]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            _write_metrics(metrics_path, rows)

        def checkpoint() -> None:
            save_checkpoint(ckpt_path, model=model, best_state=best_state, loss_fn=loss_fn, opt=opt, shuffle_gen=gen,
                            state=dict(st, config=_resume_digest(cfg), data_fingerprint=fingerprint))

        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        start_epoch = st["epoch"]
        bar = tqdm(range(start_epoch + 1, cfg.epochs + 1), desc="align", unit="epoch", initial=start_epoch,
                   total=cfg.epochs, disable=not cfg.progress or st["stopped"], dynamic_ncols=True)
        for epoch in bar:
            if st["stopped"]:
                break
            train_loss = train_epoch(model, loss_fn, opt, train, cfg.batch_size, gen)
            st["epoch"] = epoch
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                row = dict(epoch=epoch, train_loss=train_loss, scale=loss_fn.current_scale(),
                           **evaluate(model, loss_fn, val, cfg.batch_size, val_order))
                rows.append(row)
                value = row["val_loss" if cfg.select_metric == "last" else cfg.select_metric]
                if _improved(cfg.select_metric, value, st["best_value"]):
                    st.update(best_epoch=epoch, best_value=value, evals_since_best=0)
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    st["evals_since_best"] += 1
                    st["stopped"] = bool(cfg.patience and st["evals_since_best"] >= cfg.patience)
                _write_metrics(metrics_path, rows)
                bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{row['val_loss']:.3f}", r1=f"{row['r1']:.3f}")
            if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs or st["stopped"]:
                checkpoint()
        bar.close()
        train_seconds = time.perf_counter() - t0
        if st["epoch"] == start_epoch and not ckpt_path.exists():
            checkpoint()
        model.load_state_dict(best_state, strict=True)
    return _finish(cfg, data, model, rows, st, out, train_seconds, st["epoch"] - start_epoch)


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
    }
    save_projector(model.cpu(), out, provenance)
    counts: dict[str, int] = {}
    for s in data.skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    atomic_write_text(out / "skipped.tsv", "record_id\tsplit\treason\n" + "".join(
        f"{s['record_id']}\t{s['split']}\t{s['reason']}\n" for s in data.skipped))
    summary = {
        "best_epoch": st["best_epoch"], "select_metric": cfg.select_metric, "best": best_row,
        "last_epoch": st["epoch"], "stopped_early": st["stopped"], "n_train": len(data.train), "n_val": len(data.val),
        "val_source": data.val_source, "skipped": counts, "simulated": data.simulated,
        "projector_parameters": model.num_parameters(), "provenance": provenance,
        "epochs_this_run": epochs_run, "train_seconds_this_run": round(train_seconds, 3),
    }
    if cfg.figure:
        summary["figure"] = _figure(data, model, out / "tsne.png", cfg.seed, cfg.threads or None)
    save_config(cfg, out / "config.yaml")
    atomic_write_json(out / "summary.json", summary)
    return AlignResult(out, st["best_epoch"], best_row, st["epoch"], st["stopped"], rows, summary)


def _figure(data: AlignData, model: Projector, path: Path, seed: int, threads: int | None) -> dict | None:
    """t-SNE before/after on validation rows (plus training rows when validation is too small to show)."""
    from respiramfm.align.figures import tsne_before_after

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


def run(args: argparse.Namespace) -> int:
    cfg = load_config(AlignConfig, args.config, args.overrides)
    if args.fresh:
        cfg.resume = False
    result = train_align(cfg)
    b = result.best_metrics
    print(json.dumps({"out_dir": str(result.out_dir), "best_epoch": result.best_epoch, "val_loss": b["val_loss"],
                      "r1": b["r1"], "r5": b["r5"], "chance_r1": b["chance_r1"], "chance_r5": b["chance_r5"],
                      "last_epoch": result.last_epoch, "stopped_early": result.stopped_early}))
    return 0
