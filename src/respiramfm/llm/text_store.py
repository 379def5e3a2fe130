"""``respiramfm embed-text``: stage-1 text targets for a manifest, cached once per distinct context.

Layout of a store directory (one per backbone, target space and max_tokens)::

    meta.json        what the targets depend on (backbone identity, space, max_tokens) and its key
    cache/           the shared vector cache (:mod:`respiramfm.cache`): shards of float32
                     ``(dim,)`` targets keyed by sha256 of the context text
    records.tsv      record_id -> sha256 of its context text
    errors.tsv       record_id -> why it has no target (e.g. empty context)

Identical texts are computed once (many records share a context). Each chunk of
texts becomes one shard written atomically, so a killed run loses at most one
chunk and a rerun computes only texts that no shard holds yet. The store key is
the *content* identity of the backbone (weights digest or GGUF hash or hub
commit, tokenizer digest, dtype) plus space and max_tokens; a run whose key
differs from ``meta.json`` is refused rather than mixing incompatible vectors.
Several manifests may share one store: their record mappings are merged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Iterable

import numpy as np

from respiramfm.cache import VectorCache, content_key, exclusive, remove_stale_tmp
from respiramfm.cache.tables import read_tsv, write_tsv
from respiramfm.data.records import read_manifest
from respiramfm.errors import ConfigError, DataError
from respiramfm.llm import text_embed
from respiramfm.llm.backbones import load_backbone
from respiramfm.utils.io import atomic_write_json
from respiramfm.utils.progress import add_run_flags, apply_threads_flag
from respiramfm.utils.progress import progress as progress_bar

FORMAT = "respiramfm-text-targets"
VERSION = 2  # 2: vectors live in the shared vector cache (1 had its own chunk files)
KEY_FIELDS = ("weights", "tokenizer", "dtype", "arch")
RECORD_COLUMNS = ("record_id", "text_sha256")
ERROR_COLUMNS = ("record_id", "reason")


def text_key(text: str) -> str:
    """Cache key of a context: sha256 of its exact UTF-8 text."""
    return content_key(text)


def store_meta(backbone, space: str, max_tokens: int) -> dict:
    ident = backbone.identity()
    key_src = {"format": FORMAT, "version": VERSION, "space": space, "max_tokens": int(max_tokens),
               **{k: ident[k] for k in KEY_FIELDS}}
    return {**key_src, "backbone": ident, "dim": int(backbone.hidden_size),
            "key": hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()}


def _read_map(path: Path, columns: tuple[str, str]) -> dict[str, str]:
    return {row[columns[0]]: row[columns[1]] for row in read_tsv(path, columns)}


def _write_map(path: Path, columns: tuple[str, str], mapping: dict[str, str]) -> None:
    write_tsv(path, columns, mapping.items())


def _writer_lock(directory: Path):
    """Exclusive right to write a store; a second writer fails at once instead of interleaving shards."""
    return exclusive(directory / ".lock", ConfigError("another embed-text run is writing to this store",
                                                      path=directory))


def _check_meta(directory: Path, meta: dict) -> None:
    path = directory / "meta.json"
    if not path.is_file():
        atomic_write_json(path, meta)
        return
    old = _read_meta(directory)
    if old.get("key") != meta["key"]:
        diff = [k for k in ("space", "max_tokens", *KEY_FIELDS) if old.get(k) != meta.get(k)]
        raise ConfigError(f"store was built with a different backbone/space/max_tokens (differs in {diff}); "
                          "use another --out directory", path=directory)


def _read_meta(directory: Path) -> dict:
    path = directory / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("not a text-target store (no meta.json)", path=directory) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable meta.json ({exc})", path=path) from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"unsupported store format {meta.get('format')!r} v{meta.get('version')}; "
                        "rerun embed-text into a new directory", path=path)
    return meta


def embed_texts(out_dir: str | os.PathLike, backbone, texts: Iterable[str], space: str = "hidden_mean",
                max_tokens: int = 125, batch_size: int = 16, chunk_size: int = 256, progress: bool = True) -> dict:
    """Make sure the store holds a target for every distinct non-empty text; compute only what is missing.

    Returns counts and ``no_tokens``: the texts that could not be embedded
    (empty, or no tokens after tokenisation).
    """
    directory = Path(out_dir)
    with _writer_lock(directory):
        return _embed_locked(directory, backbone, texts, space, max_tokens, batch_size, chunk_size, progress)


def _embed_locked(directory: Path, backbone, texts: Iterable[str], space: str, max_tokens: int, batch_size: int,
                  chunk_size: int, progress: bool = True) -> dict:
    if space not in text_embed.SPACES:
        raise ConfigError(f"unknown text-target space {space!r} (expected one of {text_embed.SPACES})")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    meta = store_meta(backbone, space, max_tokens)
    _check_meta(directory, meta)
    cache = VectorCache(directory / "cache", {k: meta[k] for k in ("key", "space", "max_tokens", "dim")})
    remove_stale_tmp(cache.dir)
    cache.scan()
    unique: dict[str, str] = {}
    for t in texts:
        unique.setdefault(text_key(t), t)
    no_tokens = [t for t in unique.values() if not t]
    todo = [(k, t) for k, t in unique.items() if t and k not in cache]
    if todo:  # texts that tokenise to nothing are reported, not embedded
        token_ids = text_embed.tokenize(backbone, [t for _, t in todo], max_tokens)
        no_tokens += [t for (_, t), ids in zip(todo, token_ids) if not ids]
        todo = [kt for kt, ids in zip(todo, token_ids) if ids]
    with progress_bar(len(todo), "embed-text", "text", enabled=progress) as bar:
        for start in range(0, len(todo), chunk_size):
            part = todo[start:start + chunk_size]
            vecs = text_embed.text_targets(backbone, [t for _, t in part], space, max_tokens, batch_size)
            cache.put({k: v for (k, _), v in zip(part, vecs.numpy())})
            bar.update(len(part))
    return {"unique_texts": len(unique), "computed": len(todo), "reused": len(unique) - len(todo) - len(no_tokens),
            "no_tokens": no_tokens}


def embed_manifest(manifest: str | os.PathLike, out_dir: str | os.PathLike, backbone, space: str = "hidden_mean",
                   max_tokens: int = 125, batch_size: int = 16, chunk_size: int = 256, progress: bool = True) -> dict:
    """Targets for every record's ``context``; records without a usable context go to ``errors.tsv``.

    The context is embedded exactly as written (a template's explicit "not
    reported" sentence is a real text); only an empty string is an error.
    """
    records = read_manifest(manifest)
    directory = Path(out_dir)
    with _writer_lock(directory):
        counts = _embed_locked(directory, backbone, [r.context for r in records], space, max_tokens, batch_size,
                               chunk_size, progress)
        bad = set(counts.pop("no_tokens"))
        mapping = _read_map(directory / "records.tsv", RECORD_COLUMNS)
        errors = _read_map(directory / "errors.tsv", ERROR_COLUMNS)
        for r in records:
            if r.context in bad:
                mapping.pop(r.record_id, None)
                errors[r.record_id] = "empty context" if not r.context else "context produces no tokens"
            else:
                mapping[r.record_id] = text_key(r.context)
                errors.pop(r.record_id, None)
        _write_map(directory / "records.tsv", RECORD_COLUMNS, mapping)
        _write_map(directory / "errors.tsv", ERROR_COLUMNS, errors)
    n_err = sum(1 for r in records if r.context in bad)
    return {**counts, "records": len(records), "errors": n_err, "errors_path": str(directory / "errors.tsv")}


class TextTargetStore:
    """Read-only view of a store: ``.get(record_id)``, ``.ids``, ``.dim``, ``.meta``, ``.errors``.

    The targets of the store's records are read into memory once; targets of
    other texts (:meth:`get_text`) are read from the cache on demand.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.meta = _read_meta(self.directory)
        self.dim = int(self.meta["dim"])
        self.cache = VectorCache(self.directory / "cache", scan=True)
        self._keys = _read_map(self.directory / "records.tsv", RECORD_COLUMNS)
        self.errors = _read_map(self.directory / "errors.tsv", ERROR_COLUMNS)
        lost = [rid for rid, k in self._keys.items() if k not in self.cache]
        if lost:
            raise DataError(f"{len(lost)} record(s) point to texts no shard holds (e.g. {lost[:3]}); "
                            "rerun embed-text", path=self.directory)
        self._vectors = {k: self._checked(k, v) for k, v in self.cache.lookup(self._keys.values()).items()}
        self.ids = list(self._keys)

    def _checked(self, key: str, vec: np.ndarray) -> np.ndarray:
        if vec.shape != (self.dim,):
            raise DataError(f"cached text target {key[:12]}... has shape {vec.shape}, expected ({self.dim},)",
                            path=self.cache.dir / self.cache.key_to_shard[key])
        return vec

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._keys

    def text_sha256(self, record_id: str) -> str:
        if record_id not in self._keys:
            why = self.errors.get(record_id)
            msg = f"record {record_id!r} has no text target" + (f" ({why})" if why else " (not in this store)")
            raise DataError(msg, path=self.directory)
        return self._keys[record_id]

    def get(self, record_id: str) -> np.ndarray:
        """The target vector of one record (float32, shape ``(dim,)``)."""
        return self._vectors[self.text_sha256(record_id)].copy()

    def has_text(self, text: str) -> bool:
        """Whether the exact string ``text`` has a cached target (lets callers detect a changed context)."""
        return text_key(text) in self.cache

    def get_text(self, text: str) -> np.ndarray:
        """The target of an exact context string, independent of record ids."""
        key = text_key(text)
        if key not in self.cache:
            raise DataError(f"no text target for this text (sha256 {key[:12]}...)", path=self.directory)
        if key not in self._vectors:
            self._vectors[key] = self._checked(key, self.cache.get(key))
        return self._vectors[key].copy()

    def array(self, record_ids: Iterable[str] | None = None) -> tuple[list[str], np.ndarray]:
        ids = list(self.ids if record_ids is None else record_ids)
        rows = [self._vectors[self.text_sha256(rid)] for rid in ids]
        return ids, (np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, self.dim), np.float32))


def read_text_targets(directory: str | os.PathLike, record_ids: Iterable[str] | None = None
                      ) -> tuple[list[str], np.ndarray]:
    """``(record_ids, targets (N, dim) float32)`` for all records of a store, or the ones asked for."""
    return TextTargetStore(directory).array(record_ids)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="records manifest CSV (its 'context' column is embedded)")
    parser.add_argument("--out", required=True, help="text-target store directory (created; resumable)")
    parser.add_argument("--backbone", default="smollm2-135m",
                        help="LLM: 'smollm2-135m' (offline default), a local model folder, or a hub id "
                             "such as microsoft/phi-2 (the paper's LLM; needs network once)")
    parser.add_argument("--revision", default=None, help="hub revision (commit/tag) for a hub backbone")
    parser.add_argument("--space", choices=text_embed.SPACES, default="hidden_mean",
                        help="target space (hidden_mean = the paper's choice)")
    parser.add_argument("--max-tokens", type=int, default=text_embed.DEFAULT_MAX_TOKENS,
                        help="truncate each context to N tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward pass")
    parser.add_argument("--chunk-size", type=int, default=256, help="texts per persisted shard (resume granularity)")
    parser.add_argument("--dtype", default="float32", help="backbone dtype: float32, bfloat16 or float16")
    parser.add_argument("--num-layers", type=int, default=0,
                        help="keep the LLM's first N decoder layers (0 = all; match stage 2's model.num_layers)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    add_run_flags(parser)


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1 or args.batch_size < 1 or args.chunk_size < 1 or args.num_layers < 0:
        raise ConfigError("--max-tokens, --batch-size and --chunk-size must be positive, --num-layers >= 0")
    apply_threads_flag(args.threads)
    backbone = load_backbone(args.backbone, dtype=args.dtype, revision=args.revision, device=args.device)
    if args.num_layers:
        backbone.keep_first_layers(args.num_layers)
    report = embed_manifest(args.manifest, args.out, backbone, space=args.space, max_tokens=args.max_tokens,
                            batch_size=args.batch_size, chunk_size=args.chunk_size, progress=not args.no_progress)
    print(f"embed-text: {report['records']} records, {report['unique_texts']} unique texts "
          f"({report['computed']} computed, {report['reused']} reused), {report['errors']} errors -> {args.out}")
    if report["errors"]:
        print(f"embed-text: see {report['errors_path']}", file=sys.stderr)
    return 0
