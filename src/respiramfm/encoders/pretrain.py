"""``respiramfm pretrain-audio``: OPERA-style contrastive (COLA) pretraining of an HTS-AT encoder.

Why: the released OPERA-CT weights are non-commercial and need a download; this
command trains an encoder of the same architecture with the same objective on
our own manifests (or a tiny one for the offline demo), and writes it in the
bare HTS-AT key layout that :func:`respiramfm.encoders.opera_ct.from_checkpoint`
loads strictly.

Recipe, as in OPERA's ``src/pretrain/cola_training.py`` / ``src/model/models_cola.py``:
two random crops of each recording's log-mel (50 frames for cough and ICBHI
sources, 100-200 for long breathing; one ``crop_frames`` here), frame masking
and gain augmentation, HTS-AT (drop-path 0.1) -> dropout 0.1 -> ``g`` (768->512)
-> LayerNorm -> tanh -> bilinear ``W``; cross-entropy over the batch with the
diagonal as targets; Adam lr 1e-4 decayed x0.99 per epoch; batch 128;
OPERA-CT ran 250 epochs. Differences: one crop length for all sources and
batches that mix sources (OPERA draws each batch from a single source), and
the test split of every manifest is excluded by default.

Outputs in ``out_dir``: ``encoder.safetensors`` (bare HTS-AT keys),
``pretrain_config.yaml``, ``metrics.jsonl`` (step, epoch, loss, in-batch
accuracy, lr), ``recordings.tsv``, ``errors.tsv`` and ``checkpoints/``.
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
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from respiramfm.audio import FrontendConfig
from respiramfm.config import add_config_arguments, load_config, save_config, to_dict
from respiramfm.errors import ConfigError, DataError

# Settings that may change between a run and its resumption (they do not alter the result).
# ``manifests`` may move: the identity of the recordings themselves is checked separately.
RESUMABLE_KEYS = {"manifests", "out_dir", "cache_dir", "num_workers", "device", "save_every", "keep_checkpoints",
                  "log_every", "progress", "epochs", "max_steps", "cache_memory_mb", "torch_threads"}
FAULT_ENV = "RESPIRAMFM_FAULT_KILL_AFTER_STEP"  # test hook: SIGKILL this process after that step


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


def build_model(cfg: PretrainConfig):
    from respiramfm.encoders.htsat import HTSAT
    from respiramfm.encoders.pretrain_model import ColaModel

    e = cfg.encoder
    encoder = HTSAT(embed_dim=e.embed_dim, depths=tuple(e.depths), num_heads=tuple(e.num_heads),
                    window_size=e.window_size, drop_path_rate=e.drop_path_rate)
    # The audio-tagging head never touches the latent; it is kept (a strict load expects its keys)
    # but frozen, so DDP does not wait for gradients that never come.
    encoder.tscam_conv.requires_grad_(False)
    encoder.head.requires_grad_(False)
    return ColaModel(encoder, encoder.num_features, cfg.proj_dim, cfg.head_dropout)


def _prepare_out_dir(cfg: PretrainConfig, out: Path, resume: bool) -> Path | None:
    from respiramfm.encoders.pretrain_ckpt import latest_checkpoint

    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is not None and not resume:
        raise ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another out_dir")
    if ckpt is not None:
        saved = load_config(PretrainConfig, out / "pretrain_config.yaml")
        old, new = training_fingerprint(saved), training_fingerprint(cfg)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ConfigError(f"cannot resume: settings {diff} differ from the checkpointed run", path=out)
    return ckpt


def _rewrite_metrics(path: Path, upto: int) -> None:
    """Keep the metric lines of steps <= ``upto`` (the rest belong to steps that will be redone)."""
    from respiramfm.utils.io import atomic_write_text

    keep = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= upto:
                    keep.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a kill
    atomic_write_text(path, "".join(keep))


def _accelerator(cfg: PretrainConfig):
    """An Accelerator for this run; in a plain (non-launched) process an earlier, differently
    configured accelerate state (e.g. a previous in-process run with another precision) is reset."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.precision)
    except ValueError as exc:
        if "already been initialized" not in str(exc) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.precision)


def pretrain(cfg: PretrainConfig, resume: bool = False) -> Path:
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
        return _pretrain(cfg, resume)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def _pretrain(cfg: PretrainConfig, resume: bool) -> Path:
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from respiramfm.encoders import pretrain_ckpt as ck
    from respiramfm.encoders import pretrain_data as pd
    from respiramfm.encoders.pretrain_model import cola_loss
    from respiramfm.utils.io import atomic_save_safetensors

    acc = _accelerator(cfg)
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    ckpt_dir = _prepare_out_dir(cfg, out, resume)
    acc.wait_for_everyone()
    if main:
        save_config(cfg, out / "pretrain_config.yaml")

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
    steps_per_epoch = len(dataset) // (cfg.batch_size * world)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps)

    meta = {"world_size": world, "steps_per_epoch": steps_per_epoch, "seed": cfg.seed,
            "recordings": len(dataset), "recordings_sha256": pd.recordings_fingerprint(recordings)}

    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    model = build_model(cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    step = 0
    state = None
    if ckpt_dir is not None:
        state = ck.load_checkpoint(ckpt_dir, rank)
        if state["meta"].get("world_size") != world:
            raise ConfigError(f"checkpoint was written by {state['meta'].get('world_size')} processes; "
                              f"resume with the same number (now {world})", path=ckpt_dir)
        if state["meta"].get("recordings_sha256") != meta["recordings_sha256"]:
            raise DataError("cannot resume: the usable recordings differ from the checkpointed run's "
                            "(manifests, audio files or decode errors changed)", path=ckpt_dir)
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["meta"]["step"])
        acc.print(f"resuming from step {step} ({ckpt_dir})")
    elif resume:
        acc.print(f"no checkpoint in {ckpt_root}; starting from step 0")
    model, optimizer = acc.prepare(model, optimizer)
    if state is not None:
        ck.set_rng_state(state["rng"])
    else:
        torch.manual_seed(cfg.seed * 7919 + 1 + rank)  # dropout / drop-path stream, per process
    metrics_path = out / "metrics.jsonl"
    if main:
        _rewrite_metrics(metrics_path, step)
    acc.wait_for_everyone()

    def checkpoint(at: int) -> None:
        sd = {k: v for k, v in acc.unwrap_model(model).state_dict().items()}
        ck.save_checkpoint(ckpt_root, at, sd, optimizer, {**meta, "epoch": at // steps_per_epoch},
                           accelerator=acc, keep=cfg.keep_checkpoints)

    fault = int(os.environ.get(FAULT_ENV, "0") or 0)
    bar = tqdm(total=total, initial=step, desc="pretrain", unit="step", disable=not (cfg.progress and main))
    model.train()
    t0 = time.time()
    with open(metrics_path, "a", encoding="utf-8") if main else open(os.devnull, "w") as mfh:
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            dataset.set_epoch(epoch)
            lr = cfg.lr * cfg.lr_decay**epoch
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = pd.epoch_batches(len(dataset), cfg.batch_size, world, rank, cfg.seed, epoch)
            batches = batches[offset: offset + (total - step)]
            loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                collate_fn=pd.collate_views, generator=torch.Generator())
            for x1, x2 in loader:
                x1, x2 = x1.to(acc.device), x2.to(acc.device)
                with acc.autocast():
                    logits = model(x1, x2)
                loss, accuracy = cola_loss(logits)
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % cfg.log_every == 0 or step == total or step == 1:
                    vals = acc.reduce(torch.stack([loss.detach(), accuracy.detach()]).float(), reduction="mean")
                    rec = {"step": step, "epoch": epoch, "loss": round(float(vals[0]), 6),
                           "acc": round(float(vals[1]), 6), "chance": round(1.0 / cfg.batch_size, 6),
                           "lr": lr, "elapsed_s": round(time.time() - t0, 3)}
                    mfh.write(json.dumps(rec) + "\n")
                    mfh.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.2f}")
                bar.update(1)
                if step % cfg.save_every == 0 or step == total:
                    checkpoint(step)
                if fault and step == fault:
                    os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    final = out / "encoder.safetensors"
    if main:
        enc = acc.unwrap_model(model).encoder
        e = cfg.encoder
        md = {"format": "respiramfm-htsat", "embed_dim": str(e.embed_dim),
              "depths": ",".join(map(str, e.depths)), "num_heads": ",".join(map(str, e.num_heads)),
              "window_size": str(e.window_size), "out_dim": str(e.out_dim), "step": str(step),
              "objective": "cola", "seed": str(cfg.seed)}
        atomic_save_safetensors(final, dict(enc.state_dict()), metadata=md)
    acc.wait_for_everyone()
    return final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML config (see configs/pretrain_audio*.yaml); defaults otherwise",
                         "--set batch_size=32 --set encoder.embed_dim=16")
    parser.add_argument("--manifest", action="append", default=[], help="manifest CSV (repeatable; replaces manifests)")
    parser.add_argument("--out", help="output directory (overrides out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.manifest:
        overrides.append("manifests=" + json.dumps(args.manifest))
    if args.out:
        overrides.append("out_dir=" + json.dumps(args.out))
    cfg = load_config(PretrainConfig, args.config, overrides)
    final = pretrain(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        print(final)
    return 0


__all__ = ["EncoderSize", "PretrainConfig", "pretrain", "build_model", "add_arguments", "run"]
