"""``respiramfm pretrain-audio``: OPERA-style contrastive (COLA) pretraining of an HTS-AT encoder.

Why: the released OPERA-CT weights are non-commercial and need a download; this
command trains an encoder of the same architecture with the same objective on
our own manifests (or a tiny one for the offline demo), and writes it in the
bare HTS-AT key layout that :func:`respiramfm.models.opera_ct.from_checkpoint`
loads strictly.

Recipe, as in OPERA's ``src/pretrain/cola_training.py`` / ``src/model/models_cola.py``:
two random crops of each recording's log-mel (50 frames for cough and ICBHI
sources, 100-200 for long breathing; one ``crop_frames`` here), frame masking
and gain augmentation, HTS-AT (drop-path 0.1) -> dropout 0.1 -> ``g`` (768->512)
-> LayerNorm -> tanh -> bilinear ``W``; cross-entropy over the batch with the
diagonal as targets; Adam lr 1e-4 decayed x0.99 per epoch; batch 128;
OPERA-CT ran 250 epochs. Differences: one crop length for all sources and
batches that mix sources (OPERA draws each batch from a single source), and
the test split of every manifest is excluded by default, and a manifest that puts records
of a dataset the run uses only for zero-shot tasks anywhere else is refused (``task_files`` /
``tasks`` name the run's tasks; default T1-T9; :mod:`respiramfm.data.roles`).

Outputs in ``out_dir``: ``encoder.safetensors`` (bare HTS-AT keys),
``pretrain_config.yaml``, ``metrics.jsonl`` (step, epoch, loss, in-batch
accuracy, lr), ``recordings.tsv``, ``errors.tsv`` and ``checkpoints/`` (the shared engine's
format, :mod:`respiramfm.training.checkpoint`; the loop is :mod:`respiramfm.training.engine`).
A killed run continues with ``--resume`` and ends bit-identical to an
uninterrupted one (same seed, same number of processes).

Several processes: ``accelerate launch --multi_gpu --num_processes N -m
respiramfm.cli pretrain-audio ...`` (on CPUs add ``--set device=cpu``: DDP over
gloo; accelerate's ``--cpu`` flag alone starts a single process). ``batch_size``
is per process, gradients are averaged by DDP, in-batch negatives are per process.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from respiramfm.audio import FrontendConfig
from respiramfm.config import add_config_arguments, load_config, save_config, to_dict
from respiramfm.data.records import SPLITS, read_manifest
from respiramfm.data.roles import refuse_zero_shot_rows, run_tasks
from respiramfm.encoders import pretrain_data as pd
from respiramfm.encoders.pretrain_model import ColaModel, cola_loss
from respiramfm.errors import ConfigError, DataError
from respiramfm.models.htsat import HTSAT
from respiramfm.training.config import Budget, OptimConfig, RunSettings
from respiramfm.training.engine import TrainTask, Trainer, make_accelerator
from respiramfm.utils.io import atomic_save_safetensors

# Settings that may change between a run and its resumption (they do not alter the result).
# ``manifests`` may move: the identity of the recordings themselves is checked separately.
RESUMABLE_KEYS = {"manifests", "task_files", "out_dir", "cache_dir", "num_workers", "device", "save_every",
                  "keep_checkpoints", "log_every", "progress", "epochs", "max_steps", "cache_memory_mb", "torch_threads"}


@dataclass
class EncoderSize:
    """HTS-AT size (OPERA-CT: 96, 2-2-6-2, 4-8-16-32, window 8). Output width is ``8 * embed_dim``."""

    embed_dim: int = 96
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    num_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    window_size: int = 8
    drop_path_rate: float = 0.1

    @property
    def out_dim(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)


@dataclass
class PretrainConfig:
    manifests: list[str] = field(default_factory=list)
    exclude_splits: list[str] = field(default_factory=lambda: ["test"])
    task_files: list[str] = field(default_factory=list)  # the run's task definitions ([] = built-in T1-T9)
    tasks: list[str] = field(default_factory=list)       # extra task names of the run
    out_dir: str = "runs/pretrain_audio"
    cache_dir: str = ""  # "" -> <out_dir>/spec_cache
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    encoder: EncoderSize = field(default_factory=EncoderSize)
    proj_dim: int = 512
    head_dropout: float = 0.1
    crop_frames: int = 50
    mask_augment: bool = True
    gain_augment: bool = True
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_decay: float = 0.99  # multiplied in once per epoch
    epochs: int = 250
    max_steps: int = 0  # > 0 stops earlier
    seed: int = 42
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "no"  # no | bf16 | fp16
    deterministic: bool = False
    torch_threads: int = 0  # > 0: torch.set_num_threads (small models on shared CPUs run faster on 1)
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True
    cache_memory_mb: float = 2048.0

    def validate(self) -> None:
        if not self.manifests:
            raise ConfigError("no manifests given (--manifest PATH or manifests=[...])")
        e = self.encoder
        if len(e.depths) != len(e.num_heads) or not e.depths:
            raise ConfigError("encoder.depths and encoder.num_heads must have the same (non-zero) length")
        for name in ("batch_size", "crop_frames", "epochs", "save_every", "log_every", "proj_dim", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2: the contrastive loss needs in-batch negatives")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda (got {self.device!r})")
        if self.precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"precision must be no, bf16 or fp16 (got {self.precision!r})")


def training_fingerprint(cfg: PretrainConfig) -> dict:
    """The settings that define the training trajectory (all but RESUMABLE_KEYS)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_KEYS}


def build_model(cfg: PretrainConfig) -> ColaModel:
    e = cfg.encoder
    encoder = HTSAT(embed_dim=e.embed_dim, depths=tuple(e.depths), num_heads=tuple(e.num_heads),
                    window_size=e.window_size, drop_path_rate=e.drop_path_rate)
    # The audio-tagging head never touches the latent; it is kept (a strict load expects its keys)
    # but frozen, so DDP does not wait for gradients that never come.
    encoder.tscam_conv.requires_grad_(False)
    encoder.head.requires_grad_(False)
    return ColaModel(encoder, encoder.num_features, cfg.proj_dim, cfg.head_dropout)


def pretrain_budget(cfg: PretrainConfig) -> Budget:
    """AdamW at ``lr`` decayed by ``lr_decay`` once per epoch; no validation (COLA has none)."""
    optim = OptimConfig(optimizer="adamw", lr=cfg.lr, betas=[0.9, 0.999], eps=1e-8, weight_decay=cfg.weight_decay,
                        schedule="exponential", decay=cfg.lr_decay)
    return Budget(optim=optim, epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=cfg.batch_size)


class PretrainTask(TrainTask):
    """COLA for the engine: two crops per recording, in-batch negatives, batches a function of (seed, epoch)."""

    def __init__(self, cfg: PretrainConfig, model: ColaModel, dataset, acc, meta: dict):
        self.cfg, self.model, self.dataset, self.acc, self.meta = cfg, model, dataset, acc, meta
        self.steps_per_epoch = meta["steps_per_epoch"]

    def ddp_module(self):
        return self.model

    def steps_in_epoch(self, epoch: int) -> int:
        return self.steps_per_epoch

    def start_epoch(self, epoch: int, start: int) -> None:
        self.dataset.set_epoch(epoch)

    def batches(self, epoch: int, start: int):
        acc, cfg = self.acc, self.cfg
        order = pd.epoch_batches(len(self.dataset), cfg.batch_size, acc.num_processes, acc.process_index, cfg.seed,
                                 epoch)
        return DataLoader(self.dataset, batch_sampler=order[start:], num_workers=cfg.num_workers,
                          collate_fn=pd.collate_views, generator=torch.Generator())

    def compute_loss(self, views):
        x1, x2 = (x.to(self.acc.device) for x in views)
        with self.acc.autocast():
            logits = self.wrapped(x1, x2)
        loss, accuracy = cola_loss(logits)
        return loss, {"acc": accuracy}

    def train_row(self, row: dict) -> dict:
        return {**row, "loss": round(row["loss"], 6), "acc": round(row["acc"], 6),
                "chance": round(1.0 / self.cfg.batch_size, 6)}

    def checkpoint_meta(self) -> dict:
        return dict(self.meta)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())  # encoder + COLA head, buffers included

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor], path) -> None:
        self.model.load_state_dict(tensors, strict=True)


def pretrain(cfg: PretrainConfig, resume: bool = False, callbacks=()) -> Path:
    """Run (or resume) pretraining; returns the path of ``encoder.safetensors``.

    ``torch_threads`` and ``deterministic`` change process-wide torch settings for the run;
    they are restored afterwards so an in-process caller (the demo, tests) is unaffected.
    """
    cfg.validate()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available")
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        return _pretrain(cfg, resume, callbacks)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def refuse_zero_shot_audio(cfg: PretrainConfig) -> None:
    """Self-supervised or not, pretraining is training: no record of a zero-shot-only dataset may enter it.

    Rows in ``exclude_splits`` never enter; every other row of a dataset that the run's tasks
    (``task_files`` + ``tasks``, default T1-T9) use only zero-shot is refused with the count.
    """
    tasks = run_tasks(cfg.task_files, cfg.tasks)
    used = tuple(s for s in SPLITS if s not in set(cfg.exclude_splits))
    for m in cfg.manifests:
        refuse_zero_shot_rows(read_manifest(m), tasks, stage="pretrain-audio", splits=used, path=m)


def _pretrain(cfg: PretrainConfig, resume: bool, callbacks) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(cfg.device, cfg.precision, out)
    world, main = acc.num_processes, acc.is_main_process
    refuse_zero_shot_audio(cfg)
    with acc.main_process_first():  # rank 0 fills the cache; the others then read it
        items = pd.collect_audio(cfg.manifests, cfg.exclude_splits)
        recordings, errors = pd.build_spectrogram_cache(
            items, cfg.cache_dir or out / "spec_cache", cfg.frontend, progress=cfg.progress and main)
    if main:
        pd.write_reports(out, recordings, errors)
    if len(recordings) < cfg.batch_size * world:
        raise DataError(f"{len(recordings)} usable recordings ({len(errors)} skipped, see errors.tsv) "
                        f"are fewer than one step needs ({cfg.batch_size} x {world} processes)", path=out)
    dataset = pd.TwoCropDataset(pd.SpectrogramStore(recordings, cfg.cache_memory_mb), cfg.crop_frames,
                                cfg.seed, cfg.mask_augment, cfg.gain_augment)
    sha = pd.recordings_fingerprint(recordings)
    meta = {"steps_per_epoch": len(dataset) // (cfg.batch_size * world), "seed": cfg.seed,
            "recordings": len(dataset), "recordings_sha256": sha}
    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    task = PretrainTask(cfg, build_model(cfg), dataset, acc, meta)
    run = RunSettings(out_dir=str(out), name="pretrain", existing="resume" if resume else "refuse",
                      checkpoint_every=cfg.save_every, checkpoint_epoch_end=False,
                      keep_checkpoints=cfg.keep_checkpoints, log_every=cfg.log_every, log_first=True,
                      progress=cfg.progress, dropout_seed=cfg.seed * 7919 + 1 + acc.process_index,
                      data_what="usable recordings")
    trainer = Trainer(task, pretrain_budget(cfg), run, accelerator=acc, callbacks=callbacks,
                      fingerprint={"config": training_fingerprint(cfg), "data": sha})
    if main:
        save_config(cfg, out / "pretrain_config.yaml")
    st = trainer.fit()
    final = out / "encoder.safetensors"
    if main:
        e = cfg.encoder
        md = {"format": "respiramfm-htsat", "embed_dim": str(e.embed_dim),
              "depths": ",".join(map(str, e.depths)), "num_heads": ",".join(map(str, e.num_heads)),
              "window_size": str(e.window_size), "out_dim": str(e.out_dim), "step": str(st["step"]),
              "objective": "cola", "seed": str(cfg.seed)}
        atomic_save_safetensors(final, dict(task.model.encoder.state_dict()), metadata=md)
    acc.wait_for_everyone()
    return final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML config (configs/pretrain_audio.yaml, configs/cpu/pretrain_audio.yaml); defaults otherwise",
                         "--set batch_size=32 --set encoder.embed_dim=16")
    parser.add_argument("--manifest", action="append", default=[], help="manifest CSV (repeatable; replaces manifests)")
    parser.add_argument("--out", help="output directory (overrides out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (overrides torch_threads)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (plain progress lines on stderr instead; overrides progress)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.manifest:
        overrides.append("manifests=" + json.dumps(args.manifest))
    if args.out:
        overrides.append("out_dir=" + json.dumps(args.out))
    if args.threads is not None:
        if args.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {args.threads}")
        overrides.append(f"torch_threads={args.threads}")
    if args.no_progress:
        overrides.append("progress=false")
    cfg = load_config(PretrainConfig, args.config, overrides)
    final = pretrain(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        print(final)
    return 0


__all__ = ["EncoderSize", "PretrainConfig", "pretrain", "build_model", "add_arguments", "run"]
