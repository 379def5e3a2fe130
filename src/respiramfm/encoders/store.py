"""``respiramfm embed``: compute audio embeddings for a manifest once, resumably, in bounded memory.

Why it is built this way:

* **Computed once.** A vector is cached under (sha256 of the audio bytes, front-end
  key, encoder weights hash, pooled|tokens), so re-runs, other manifests and
  other experiments that share ``--cache-dir`` reuse it (the shared vector cache
  :mod:`respiramfm.cache`; view layout in :mod:`respiramfm.cache.view`).
* **Resumable.** Work is cut into batches; each finished batch is one shard
  written atomically. A killed run loses at most the batches in flight, and a
  rerun skips every key already in a shard.
* **Reproducible.** The batch plan is a pure function of the pending items
  (sorted by duration, then content hash, cut every ``batch_size``): removing
  finished batches and re-cutting gives the same remaining batches, and ranks
  take whole batches, so 1 process, N processes and a resumed run feed the
  encoder identical batches and produce bit-identical vectors.
* **Bounded memory.** Only one batch of audio and spectrograms is alive per
  process; the final array is assembled shard by shard into a memory map.
* **Nothing lost.** Undecodable files go to ``errors.tsv`` (record_id, path,
  cause), records without audio to ``skipped.tsv``; failures are remembered in
  the shard so a resume does not retry them (``--retry-errors`` does).
* **Multi-process.** Under ``accelerate launch`` or ``torchrun`` the main process
  plans and broadcasts the batches, each rank computes its share
  (``PartialState.split_between_processes``), and after ``wait_for_everyone``
  the main process writes the view.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from respiramfm import audio
from respiramfm.cache import VectorCache, exclusive, group_id, remove_stale_tmp
from respiramfm.cache.tables import write_tsv
from respiramfm.cache.view import EmbeddingStore, read_embeddings, write_view
from respiramfm.data.records import read_manifest, resolve_audio_path
from respiramfm.encoders.registry import get_encoder
from respiramfm.errors import DataError, RespiraMFMError
from respiramfm.utils.progress import add_run_flags, apply_threads_flag
from respiramfm.utils.progress import progress as progress_bar
from respiramfm.utils.io import atomic_write_json, sha256_file

__all__ = ["embed_manifest", "EmbeddingStore", "read_embeddings", "add_arguments", "run"]


# ---------------------------------------------------------------------------- planning


def _probe_duration(path: str) -> float | None:
    """Duration from the file header (soundfile, then PyAV); ``None`` if neither can tell.

    Only used to sort clips of similar length together; a wrong or missing value
    costs speed, never correctness.
    """
    try:
        import soundfile

        return float(soundfile.info(path).duration)
    except Exception:
        pass
    try:
        import av

        with av.open(path) as container:
            if container.duration:
                return float(container.duration) / 1_000_000  # av.time_base
    except Exception:
        pass
    return None


class _HashMemo:
    """``path -> (size, mtime_ns, sha256, duration)`` so reruns only ``stat`` unchanged files."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list] = {}
        self.dirty = False
        if path.exists():
            try:
                self.entries = json.loads(path.read_text())
            except ValueError:
                self.entries = {}

    def lookup(self, file: Path) -> tuple[str, float | None]:
        """sha256 and duration of ``file``; raises OSError when it cannot be read."""
        st = file.stat()
        key = str(file.resolve())
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2], hit[3]
        if not file.is_file():
            raise IsADirectoryError(f"{file} is not a regular file")
        sha = sha256_file(file)
        duration = _probe_duration(str(file))
        self.entries[key] = [st.st_size, st.st_mtime_ns, sha, duration]
        self.dirty = True
        return sha, duration

    def save(self) -> None:
        """Merge our new entries into the file under a lock: runs may share one cache directory."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(self.path.parent / ".memo.lock"):
            remove_stale_tmp(self.path.parent, self.path.name)  # every writer of this file holds the lock
            if self.dirty:
                merged = _HashMemo(self.path).entries if self.path.exists() else {}
                merged.update(self.entries)
                atomic_write_json(self.path, merged)


@dataclasses.dataclass
class _Plan:
    """What the main process decided; broadcast to every rank (``batches``) or kept (the rest)."""

    records: list  # (record_id, path str, sha | None, status) with status 'audio'|'skipped'|'error:<cause>'
    items: dict  # sha -> path of one file with that content
    todo: list  # shas to compute, in batch order
    batches: list  # list of [(sha, path), ...]


def _make_plan(records, manifest_dir: Path, memo: _HashMemo, group: VectorCache, batch_size: int,
               retry_errors: bool) -> _Plan:
    resolved, items, durations = [], {}, {}
    for rec in records:
        path = resolve_audio_path(rec, manifest_dir)
        if path is None:
            resolved.append((rec.record_id, "", None, "skipped"))
            continue
        try:
            sha, duration = memo.lookup(path)
        except FileNotFoundError:
            resolved.append((rec.record_id, str(path), None, "error:audio file not found"))
            continue
        except OSError as exc:
            resolved.append((rec.record_id, str(path), None, f"error:cannot read audio file ({exc.strerror or exc})"))
            continue
        resolved.append((rec.record_id, str(path), sha, "audio"))
        items.setdefault(sha, str(path))
        durations.setdefault(sha, duration)
    pending = [s for s in items if s not in group.key_to_shard and (retry_errors or s not in group.failed)]
    pending.sort(key=lambda s: (durations[s] if durations[s] is not None else math.inf, s))
    batches = [[(s, items[s]) for s in pending[i:i + batch_size]] for i in range(0, len(pending), batch_size)]
    return _Plan(records=resolved, items=items, todo=pending, batches=batches)


# ---------------------------------------------------------------------------- compute


def _load(path: str, sr: int):
    try:
        return audio.load(path, sr=sr), None
    except RespiraMFMError as exc:
        return None, exc.cause
    except OSError as exc:
        return None, f"cannot read audio file ({exc.strerror or exc})"


def _frontend(waves: list, cfg, device: str) -> tuple[list, list]:
    """Spectrograms for ``waves``; a wave the front end rejects gets a cause instead."""
    try:
        return list(audio.opera_spectrogram_batch(waves, cfg=cfg, device=device)), [None] * len(waves)
    except RespiraMFMError:
        pass  # find the culprit(s) one by one
    specs, causes = [], []
    for w in waves:
        try:
            specs.append(audio.opera_spectrogram_batch([w], cfg=cfg, device=device)[0])
            causes.append(None)
        except RespiraMFMError as exc:
            specs.append(None)
            causes.append(f"front end failed: {exc.cause}")
    return specs, causes


def _compute_batch(batch, encoder, cfg, device: str, tokens: bool, pool) -> tuple[dict, dict]:
    """Embed one batch -> ({sha: vector}, {sha: cause}). Only one batch is ever in memory."""
    loaded = list(pool.map(lambda it: _load(it[1], cfg.sr), batch)) if pool else [_load(p, cfg.sr) for _, p in batch]
    failed = {sha: cause for (sha, _), (_, cause) in zip(batch, loaded) if cause is not None}
    ok = [(sha, wave) for (sha, _), (wave, cause) in zip(batch, loaded) if cause is None]
    arrays: dict[str, np.ndarray] = {}
    if ok:
        specs, causes = _frontend([w for _, w in ok], cfg, device)
        good = []
        for (sha, _), spec, cause in zip(ok, specs, causes):
            if cause is None:
                good.append((sha, spec))
            else:
                failed[sha] = cause
        if good:
            fn = encoder.encode_tokens if tokens else encoder.encode
            out = fn([s for _, s in good])
            for (sha, _), vec in zip(good, out):
                if np.isfinite(vec).all():
                    arrays[sha] = vec
                else:
                    failed[sha] = "encoder produced non-finite values"
    return arrays, failed


def _broadcast(state, obj):
    if state.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def embed_manifest(manifest: str | os.PathLike, out_dir: str | os.PathLike, encoder: str = "logmel-stats", *,
                   checkpoint: str | None = None, batch_size: int = 16, device: str = "cpu",
                   crop: str | None = None, input_sec: float | None = None, tokens: bool = False,
                   cache_dir: str | os.PathLike | None = None, num_workers: int = 0, retry_errors: bool = False,
                   progress: bool = True) -> dict | None:
    """Embed every record of ``manifest`` into the store ``out_dir``; see the module doc.

    Returns the store's meta (counts included) on the main process, ``None`` on
    the other ranks of a multi-process launch.
    """
    from accelerate import PartialState  # heavy (torch.distributed); only an actual run needs it

    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    spec = get_encoder(encoder)
    if tokens and not spec.supports_tokens:
        raise DataError(f"encoder {encoder!r} has no token grid (--tokens)")
    cfg = spec.frontend
    changes = {k: v for k, v in (("crop", crop), ("input_sec", input_sec)) if v is not None}
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
    state = PartialState(cpu=(device == "cpu"))
    if device != "cpu" and state.num_processes > 1:
        device = str(state.device)
    enc = spec.build(checkpoint, device)
    kind = "tokens" if tokens else "pooled"
    out_dir = Path(out_dir)
    cache_root = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    gid = group_id(encoder=enc.name, weights=enc.weights_hash, frontend=cfg.key(), kind=kind)
    busy = DataError("another `respiramfm embed` run is using this store", path=out_dir)
    description = {"encoder": enc.name, "weights_hash": enc.weights_hash, "frontend_key": cfg.key(),
                   "frontend": dataclasses.asdict(cfg), "kind": kind, "out_dim": enc.out_dim}
    item_shape = (64, enc.out_dim) if tokens else (enc.out_dim,)

    with contextlib.ExitStack() as locks:
        plan, failure = None, None
        if state.is_main_process:
            try:
                locks.enter_context(exclusive(out_dir / ".lock", busy))
                group = VectorCache(cache_root / gid, description)
                locks.enter_context(exclusive(group.dir / ".lock", DataError(busy.cause, path=group.dir)))
                remove_stale_tmp(out_dir)
                remove_stale_tmp(group.dir)
                group.scan()
                records = read_manifest(manifest)
                memo = _HashMemo(cache_root / "file_hashes.json")
                plan = _make_plan(records, Path(manifest).parent, memo, group, batch_size, retry_errors)
                memo.save()
            except BaseException as exc:
                failure = exc
        batches = _broadcast(state, plan.batches if plan is not None and failure is None else None)
        if failure is not None:
            raise failure
        if batches is None:
            raise DataError("the main process failed while planning; see its error")
        if not state.is_main_process:
            group = VectorCache(cache_root / gid)

        order = [i for r in range(state.num_processes) for i in range(r, len(batches), state.num_processes)]
        with state.split_between_processes(order) as mine:
            n_clips = sum(len(batches[i]) for i in mine)
            bar = (progress_bar(n_clips, f"embed {enc.name}", "clip", enabled=progress) if state.is_main_process
                   else tqdm(total=n_clips, disable=True))
            with ThreadPoolExecutor(num_workers) if num_workers > 0 else contextlib.nullcontext() as pool:
                for i in mine:
                    arrays, failed = _compute_batch(batches[i], enc, cfg, device, tokens, pool)
                    group.put(arrays, failed, writer=f"rank{state.process_index}/{state.num_processes}")
                    bar.update(len(batches[i]))
            bar.close()
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        return _finish(out_dir, manifest, group, plan, spec, enc, cfg, kind, item_shape, checkpoint)


def _finish(out_dir: Path, manifest, group: VectorCache, plan: _Plan, spec, enc, cfg, kind: str,
            item_shape: tuple, checkpoint: str | None) -> dict:
    """Main process, after every rank is done: index the cache, write the view and the reports."""
    group.scan()
    lost = [s for s in plan.todo if s not in group.key_to_shard and s not in group.failed]
    if lost:
        raise DataError(f"{len(lost)} planned item(s) have no shard; a worker must have failed", path=group.dir)
    group.write_index()
    ids, keys, errors, skipped = [], [], [], []
    for rid, path, sha, status in plan.records:
        if status == "skipped":
            skipped.append((rid, "no audio"))
        elif status.startswith("error:"):
            errors.append((rid, path, status[len("error:"):]))
        elif sha in group.key_to_shard:
            ids.append(rid)
            keys.append(sha)
        else:
            errors.append((rid, path, group.failed[sha]))
    todo = set(plan.todo)
    embedded_unique = set(keys)
    computed = len(embedded_unique & todo)
    counts = {"records": len(plan.records), "embedded": len(ids), "errors": len(errors), "skipped": len(skipped),
              "unique_audio": len(plan.items), "computed": computed, "reused": len(embedded_unique) - computed,
              "failed_computed": len(todo - embedded_unique)}
    meta = {"encoder": enc.name, "weights_hash": enc.weights_hash, "frontend_key": cfg.key(),
            "frontend": dataclasses.asdict(cfg), "kind": kind, "dim": enc.out_dim, "manifest": str(manifest),
            "checkpoint": None if checkpoint is None else str(checkpoint), "cache_group": group.gid,
            "cache_dir": os.path.relpath(group.dir, out_dir), "counts": counts, "description": spec.description}
    write_tsv(out_dir / "errors.tsv", ("record_id", "path", "cause"), errors)
    write_tsv(out_dir / "skipped.tsv", ("record_id", "reason"), skipped)
    write_view(out_dir, group, ids, keys, item_shape, meta)
    return meta


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="records manifest CSV")
    parser.add_argument("--encoder", required=True, help="registered encoder name (opera-ct, logmel-stats, ...)")
    parser.add_argument("--checkpoint", default=None, help="encoder weights, for encoders that need them")
    parser.add_argument("--out", required=True, help="store directory (index.json, embeddings, reports, cache/)")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per batch and per cache shard")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (multi-process: each rank's own GPU)")
    parser.add_argument("--crop", choices=("whole", "first", "peak"), default=None,
                        help="front-end crop policy (default: the encoder's)")
    parser.add_argument("--input-sec", type=float, default=None, help="front-end clip length in seconds")
    parser.add_argument("--tokens", action="store_true",
                        help="store the (64, D) token grid instead of the pooled vector")
    parser.add_argument("--cache-dir", default=None, help="shared content-addressed cache (default OUT/cache)")
    parser.add_argument("--num-workers", type=int, default=0, help="threads decoding audio (0: in line)")
    parser.add_argument("--retry-errors", action="store_true", help="retry files that failed in an earlier run")
    add_run_flags(parser)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    apply_threads_flag(args.threads)
    meta = embed_manifest(args.manifest, args.out, args.encoder, checkpoint=args.checkpoint,
                          batch_size=args.batch_size, device=args.device, crop=args.crop,
                          input_sec=args.input_sec, tokens=args.tokens, cache_dir=args.cache_dir,
                          num_workers=args.num_workers, retry_errors=args.retry_errors,
                          progress=not args.no_progress)
    state = PartialState()
    if state.use_distributed:  # a clean exit for torchrun / accelerate launch
        state.destroy_process_group()
    if meta is not None:
        c = meta["counts"]
        print(f"embedded {c['embedded']}/{c['records']} records ({c['computed']} computed, {c['reused']} reused), "
              f"{c['errors']} error(s) in errors.tsv, {c['skipped']} skipped (no audio) -> {args.out}",
              file=sys.stdout)
    return 0
