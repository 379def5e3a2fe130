"""Data for contrastive pretraining: a spectrogram cache, two-crop views, and the batch order.

Why a cache: COLA draws fresh crops of every recording each epoch, but the
OPERA front end (decode, resample, trim, mel) is the expensive part and never
changes, so each recording is turned into its (T, 64) log-mel once and stored
as float16 ``.npy`` (half the bytes; the values are in [0, 1]). Files are keyed
by the audio file's path, size and mtime plus a hash of the front-end settings,
written atomically, and reused by later or resumed runs. Undecodable
recordings are skipped and listed in ``errors.tsv``; nothing else is lost.

Why per-item seeding: each view is drawn from ``numpy.random.default_rng((seed,
epoch, index))`` and the batch order from a generator seeded by ``(seed,
epoch)``, so a run's data stream is a pure function of the seed. Resuming at
step k only needs the epoch and the batch position, never a saved RNG, and the
result does not depend on DataLoader worker count or process rank.

Augmentations follow OPERA's COLA pretraining (``src/util.py``): frame masking
(a frame starts a masked run with p 0.1, a run continues with p 0.2; masked
frames take the recording's mean), applied before cropping, then a random gain
in [0.9, 1.1] per crop.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from respiramfm.config import to_dict
from respiramfm.data.records import read_manifest, resolve_audio_path
from respiramfm.errors import DataError, RespiraMFMError
from respiramfm.utils.io import atomic_path, atomic_write_text, csv_row

log = logging.getLogger(__name__)

MASK_START = 0.1  # OPERA random_mask rate_start
MASK_CONTINUE = 0.2  # OPERA random_mask rate_seq
GAIN_RANGE = (0.9, 1.1)  # OPERA random_multiply


@dataclass(frozen=True)
class Recording:
    """One usable recording: where it came from and where its spectrogram is cached."""

    record_id: str
    manifest: str
    audio_path: str
    spec_path: str
    frames: int


def collect_audio(manifests: Sequence[str], exclude_splits: Sequence[str]) -> list[tuple[str, str, Path]]:
    """(manifest, record_id, audio path) of every record with audio, in manifest order.

    Records whose split is in ``exclude_splits`` are left out (by default the
    test split, so downstream test audio never shapes the encoder). The same
    audio file listed twice is kept once: a duplicate in a batch would be a false
    negative for the contrastive loss.
    """
    if not manifests:
        raise DataError("no manifests given (set manifests=[...])")
    out: list[tuple[str, str, Path]] = []
    seen: set[str] = set()
    excluded = set(exclude_splits)
    for m in manifests:
        mdir = Path(m).resolve().parent
        for rec in read_manifest(m):
            if rec.split in excluded or not rec.has_audio:
                continue
            path = resolve_audio_path(rec, mdir)
            key = os.path.normcase(os.path.abspath(path))
            if key in seen:
                continue
            seen.add(key)
            out.append((str(m), rec.record_id, Path(key)))
    return out


def frontend_fingerprint(frontend_cfg) -> str:
    """Name of the front-end settings (``FrontendConfig.key()``): a change invalidates the cache."""
    if hasattr(frontend_cfg, "key"):
        return frontend_cfg.key()
    blob = json.dumps(to_dict(frontend_cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _spec_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()


def build_spectrogram_cache(
    items: Sequence[tuple[str, str, Path]],
    cache_dir: str | os.PathLike,
    frontend_cfg,
    *,
    chunk: int = 16,
    progress: bool = True,
) -> tuple[list[Recording], list[tuple[str, str, str, str]]]:
    """Compute (or reuse) the cached spectrogram of every item.

    Returns the usable recordings (in input order) and the errors as
    ``(manifest, record_id, audio_path, message)`` rows. Waves are decoded and
    pushed through the batched front end ``chunk`` at a time
    (:func:`respiramfm.audio.opera_spectrogram_files`); a file that fails to
    decode or featurise costs only itself.
    """
    from tqdm.auto import tqdm

    from respiramfm import audio

    root = Path(cache_dir) / frontend_fingerprint(frontend_cfg)
    recordings: dict[int, Recording] = {}
    errors: list[tuple[int, tuple[str, str, str, str]]] = []  # (input index, row)
    todo: list[tuple[int, Path]] = []
    for i, (manifest, rid, path) in enumerate(items):
        try:
            key = _spec_key(path)
        except OSError as exc:
            errors.append((i, (manifest, rid, str(path), f"cannot read audio: {exc.strerror or exc}")))
            continue
        spec_path = root / key[:2] / f"{key}.npy"
        if spec_path.is_file():
            try:
                arr = np.load(spec_path, mmap_mode="r")
                recordings[i] = Recording(rid, manifest, str(path), str(spec_path), int(arr.shape[0]))
                continue
            except (OSError, ValueError):
                pass  # unreadable cache entry: recompute it
        todo.append((i, spec_path))

    def store(i: int, spec_path: Path, spec) -> None:
        arr = np.asarray(spec, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] < 1 or not np.isfinite(arr).all():
            raise DataError(f"front end returned an unusable spectrogram of shape {arr.shape}", path=items[i][2])
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(spec_path, suffix=".npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, arr.astype(np.float16))
        manifest, rid, path = items[i]
        recordings[i] = Recording(rid, manifest, str(path), str(spec_path), int(arr.shape[0]))

    def fail(i: int, exc: BaseException) -> None:
        manifest, rid, path = items[i]
        msg = exc.cause if isinstance(exc, RespiraMFMError) else f"{type(exc).__name__}: {exc}"
        errors.append((i, (manifest, rid, str(path), msg)))
        log.warning("skipping %s: %s", path, msg)

    bar = tqdm(total=len(todo), desc="spectrograms", unit="rec", disable=not progress or not todo)
    for start in range(0, len(todo), chunk):
        batch = todo[start : start + chunk]
        paths = [items[i][2] for i, _ in batch]
        try:  # threaded decode + batched front end; a bad file comes back as its error
            results = audio.opera_spectrogram_files(paths, frontend_cfg)
        except (RespiraMFMError, ValueError, RuntimeError, FloatingPointError):
            results = []  # an unexpected batch failure: isolate it file by file
            for p in paths:
                try:
                    results.append(audio.opera_spectrogram_files([p], frontend_cfg)[0])
                except (RespiraMFMError, ValueError, RuntimeError, FloatingPointError) as exc:
                    results.append(exc)
        for (i, spec_path), res in zip(batch, results, strict=True):
            try:
                if isinstance(res, BaseException):
                    raise res
                store(i, spec_path, res)
            except (RespiraMFMError, ValueError, RuntimeError, FloatingPointError) as exc:
                fail(i, exc)
        bar.update(len(batch))
    bar.close()
    errors.sort(key=lambda e: e[0])
    return [recordings[i] for i in sorted(recordings)], [e[1] for e in errors]


def recordings_fingerprint(recordings: Sequence[Recording]) -> str:
    """Identity of the training set (ids, manifest names, lengths, order): a resume must see the same one."""
    h = hashlib.sha256()
    for r in recordings:
        h.update(f"{Path(r.manifest).name}\t{r.record_id}\t{r.frames}\n".encode())
    return h.hexdigest()


def write_reports(out_dir: str | os.PathLike, recordings: Sequence[Recording], errors: Sequence[tuple]) -> None:
    """``recordings.tsv`` (what was trained on) and ``errors.tsv`` (what was skipped and why)."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["manifest", "record_id", "audio_path", "frames"])
    for r in recordings:
        w.writerow(csv_row([r.manifest, r.record_id, r.audio_path, r.frames]))
    atomic_write_text(Path(out_dir) / "recordings.tsv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["manifest", "record_id", "audio_path", "error"])
    for e in errors:
        w.writerow(csv_row([*e[:3], " ".join(str(e[3]).split())]))
    atomic_write_text(Path(out_dir) / "errors.tsv", buf.getvalue())


class SpectrogramStore:
    """Cached spectrograms by index: all in memory when small, else memory-mapped."""

    def __init__(self, recordings: Sequence[Recording], memory_limit_mb: float = 2048.0):
        self.recordings = list(recordings)
        total = sum(r.frames for r in self.recordings) * 64 * 2
        self.in_memory = total <= memory_limit_mb * 2**20
        self._arrays = [np.load(r.spec_path) for r in self.recordings] if self.in_memory else None

    def __len__(self) -> int:
        return len(self.recordings)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._arrays is not None:
            return self._arrays[i]
        return np.load(self.recordings[i].spec_path, mmap_mode="r")


def frame_mask(rng: np.random.Generator, n: int, p_start: float = MASK_START,
               p_cont: float = MASK_CONTINUE) -> np.ndarray:
    """OPERA's masked-run chain, vectorised.

    Frame i is masked if a run starts there (p_start) or frame i-1 was masked and
    the run continues (p_cont). Equivalently: the latest start at or before i is
    no earlier than the latest frame (at or before i) that refused to continue.
    """
    idx = np.arange(n)
    starts = rng.random(n) < p_start
    stops = rng.random(n) >= p_cont
    last_start = np.maximum.accumulate(np.where(starts, idx, -1))
    last_stop = np.maximum.accumulate(np.where(stops, idx, -1))
    return (last_start >= 0) & (last_start >= last_stop)


class TwoCropDataset(Dataset):
    """Item i of epoch e -> two augmented (crop_frames, 64) float32 crops of recording i."""

    def __init__(self, store: SpectrogramStore, crop_frames: int, seed: int, mask: bool = True, gain: bool = True):
        if crop_frames < 1:
            raise ValueError("crop_frames must be positive")
        self.store, self.crop_frames, self.seed = store, int(crop_frames), int(seed)
        self.mask, self.gain = mask, gain
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, int(i)))
        spec = self.store[i]
        n, c = spec.shape[0], self.crop_frames
        if n < c:  # repeat in time, as the front end repeat-pads short clips
            spec = np.tile(spec, (-(-c // n), 1))
            n = spec.shape[0]
        mask = frame_mask(rng, n) if self.mask else None
        mean = float(np.asarray(spec, dtype=np.float32).mean()) if self.mask else 0.0
        views = []
        for _ in range(2):
            s = int(rng.integers(0, n - c + 1))
            x = np.array(spec[s : s + c], dtype=np.float32)
            if mask is not None:
                x[mask[s : s + c]] = mean
            if self.gain:
                x *= rng.uniform(*GAIN_RANGE)
            views.append(torch.from_numpy(x))
        return views[0], views[1]


def epoch_batches(n: int, batch_size: int, world: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches for one epoch: a seeded permutation cut into equal global steps.

    Every step takes ``batch_size * world`` recordings; the remainder is dropped
    so all ranks run the same number of steps and every batch has the same size.
    """
    state = np.random.SeedSequence((int(seed), int(epoch), 0x5EED)).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    perm = torch.randperm(n, generator=g).tolist()
    per_step = batch_size * world
    return [
        perm[s * per_step + rank * batch_size : s * per_step + (rank + 1) * batch_size] for s in range(n // per_step)
    ]


def collate_views(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
