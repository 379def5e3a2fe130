"""On-disk cache of stage-1 text targets, one directory per (backbone, space, max_tokens).

Layout of a store directory::

    meta.json            what the targets depend on (backbone identity, space, max_tokens)
    chunks/000000.safetensors ...
                         float32 ``targets`` (k, dim); metadata ``keys`` = JSON list of
                         sha256(text) for the k rows
    records.tsv          record_id -> sha256 of its context text
    errors.tsv           record_id -> why it has no target (e.g. empty context)

Identical texts are computed once (many records share a context). Each chunk
is written atomically when finished, so a killed run loses at most one chunk
and a rerun computes only texts that no chunk holds yet. The cache key is the
*content* identity of the backbone (weights digest or GGUF hash or hub commit,
tokenizer digest, dtype) plus space and max_tokens; a run whose key differs
from ``meta.json`` is refused rather than mixing incompatible vectors. Several
manifests may share one store: their record mappings are merged.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from respiramfm.errors import ConfigError, DataError
from respiramfm.utils.io import atomic_save_safetensors, atomic_write_json, atomic_write_text

FORMAT = "respiramfm-text-targets"
VERSION = 1
KEY_FIELDS = ("weights", "tokenizer", "dtype", "arch")
RECORD_COLUMNS = ("record_id", "text_sha256")
ERROR_COLUMNS = ("record_id", "reason")


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def store_meta(backbone, space: str, max_tokens: int) -> dict:
    ident = backbone.identity()
    key_src = {"format": FORMAT, "version": VERSION, "space": space, "max_tokens": int(max_tokens),
               **{k: ident[k] for k in KEY_FIELDS}}
    return {**key_src, "backbone": ident, "dim": int(backbone.hidden_size),
            "key": hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()}


def _read_tsv(path: Path, columns: tuple[str, str]) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline=""), delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"unreadable table ({exc})", path=path) from None
    if not rows or tuple(rows[0]) != columns or any(len(r) != 2 for r in rows[1:]):
        raise DataError(f"malformed table (expected two tab-separated columns {columns})", path=path)
    return {r[0]: r[1] for r in rows[1:]}


def _write_tsv(path: Path, columns: tuple[str, str], mapping: dict[str, str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(columns)
    w.writerows(mapping.items())
    atomic_write_text(path, buf.getvalue())


def _chunk_files(directory: Path) -> list[Path]:
    return sorted((directory / "chunks").glob("[0-9]*.safetensors"))


def _load_chunks(directory: Path, dim: int, vectors: bool = True) -> tuple[dict[str, int], np.ndarray | None]:
    """Cached vectors as ``(key -> row, matrix)``; with ``vectors=False`` only the keys are read.

    Every chunk's header is validated against ``dim``; a damaged chunk is a :class:`DataError`.
    """
    from safetensors import safe_open

    keys: dict[str, int] = {}
    blocks: list[np.ndarray] = []
    n = 0
    for path in _chunk_files(directory):
        try:
            with safe_open(str(path), framework="np") as fh:
                chunk_keys = json.loads((fh.metadata() or {}).get("keys", "null"))
                shape = tuple(fh.get_slice("targets").get_shape())
                block = fh.get_tensor("targets") if vectors else None
        except Exception as exc:  # safetensors raises several exception types for damaged files
            raise DataError(f"damaged text-target chunk ({exc}); delete it and rerun embed-text", path=path) from None
        if not isinstance(chunk_keys, list) or shape != (len(chunk_keys), dim):
            raise DataError(f"text-target chunk has shape {shape} for {dim}-d targets "
                            f"and {len(chunk_keys) if isinstance(chunk_keys, list) else '?'} keys", path=path)
        for k in chunk_keys:
            keys.setdefault(k, n)
            n += 1
        if block is not None:
            blocks.append(block.astype(np.float32, copy=False))
    if not vectors:
        return keys, None
    return keys, (np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32))


@contextlib.contextmanager
def _writer_lock(directory: Path) -> Iterator[None]:
    """Exclusive right to write a store; a second writer fails at once instead of interleaving chunks."""
    from filelock import FileLock, Timeout

    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / ".lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError("another embed-text run is writing to this store", path=directory) from None
    try:
        yield
    finally:
        lock.release()


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
        raise DataError(f"unsupported store format {meta.get('format')!r} v{meta.get('version')}", path=path)
    return meta


def embed_texts(out_dir: str | os.PathLike, backbone, texts: Iterable[str], space: str = "hidden_mean",
                max_tokens: int = 125, batch_size: int = 16, chunk_size: int = 256) -> dict:
    """Make sure the store holds a target for every distinct non-empty text; compute only what is missing.

    Returns counts and ``no_tokens``: the texts that could not be embedded
    (empty, or no tokens after tokenisation).
    """
    directory = Path(out_dir)
    with _writer_lock(directory):
        return _embed_locked(directory, backbone, texts, space, max_tokens, batch_size, chunk_size)


def _embed_locked(directory: Path, backbone, texts: Iterable[str], space: str, max_tokens: int, batch_size: int,
                  chunk_size: int) -> dict:
    from tqdm.auto import tqdm

    from respiramfm.llm import text_embed

    if space not in text_embed.SPACES:
        raise ConfigError(f"unknown text-target space {space!r} (expected one of {text_embed.SPACES})")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    meta = store_meta(backbone, space, max_tokens)
    _check_meta(directory, meta)
    have, _ = _load_chunks(directory, meta["dim"], vectors=False)
    unique: dict[str, str] = {}
    for t in texts:
        unique.setdefault(text_key(t), t)
    no_tokens = [t for t in unique.values() if not t]
    todo = [(k, t) for k, t in unique.items() if t and k not in have]
    if todo:  # texts that tokenise to nothing are reported, not embedded
        token_ids = text_embed.tokenize(backbone, [t for _, t in todo], max_tokens)
        no_tokens += [t for (_, t), ids in zip(todo, token_ids) if not ids]
        todo = [kt for kt, ids in zip(todo, token_ids) if ids]
    next_id = max((int(p.stem) for p in _chunk_files(directory)), default=-1) + 1
    with tqdm(total=len(todo), desc="embed-text", unit="text", disable=None) as bar:
        for start in range(0, len(todo), chunk_size):
            part = todo[start:start + chunk_size]
            vecs = text_embed.text_targets(backbone, [t for _, t in part], space, max_tokens, batch_size)
            atomic_save_safetensors(directory / "chunks" / f"{next_id:06d}.safetensors", {"targets": vecs},
                                    metadata={"keys": json.dumps([k for k, _ in part])})
            next_id += 1
            bar.update(len(part))
    return {"unique_texts": len(unique), "computed": len(todo), "reused": len(unique) - len(todo) - len(no_tokens),
            "no_tokens": no_tokens}


def embed_manifest(manifest: str | os.PathLike, out_dir: str | os.PathLike, backbone, space: str = "hidden_mean",
                   max_tokens: int = 125, batch_size: int = 16, chunk_size: int = 256) -> dict:
    """Targets for every record's ``context``; records without a usable context go to ``errors.tsv``.

    The context is embedded exactly as written (a template's explicit "not
    reported" sentence is a real text); only an empty string is an error.
    """
    from respiramfm.data.records import read_manifest

    records = read_manifest(manifest)
    directory = Path(out_dir)
    with _writer_lock(directory):
        counts = _embed_locked(directory, backbone, [r.context for r in records], space, max_tokens, batch_size,
                               chunk_size)
        bad = set(counts.pop("no_tokens"))
        mapping = _read_tsv(directory / "records.tsv", RECORD_COLUMNS)
        errors = _read_tsv(directory / "errors.tsv", ERROR_COLUMNS)
        for r in records:
            if r.context in bad:
                mapping.pop(r.record_id, None)
                errors[r.record_id] = "empty context" if not r.context else "context produces no tokens"
            else:
                mapping[r.record_id] = text_key(r.context)
                errors.pop(r.record_id, None)
        _write_tsv(directory / "records.tsv", RECORD_COLUMNS, mapping)
        _write_tsv(directory / "errors.tsv", ERROR_COLUMNS, errors)
    n_err = sum(1 for r in records if r.context in bad)
    return {**counts, "records": len(records), "errors": n_err, "errors_path": str(directory / "errors.tsv")}


class TextTargetStore:
    """Read-only view of a store: ``.get(record_id)``, ``.ids``, ``.dim``, ``.meta``, ``.errors``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.meta = _read_meta(self.directory)
        self.dim = int(self.meta["dim"])
        self._rows, self._matrix = _load_chunks(self.directory, self.dim)
        self._keys = _read_tsv(self.directory / "records.tsv", RECORD_COLUMNS)
        self.errors = _read_tsv(self.directory / "errors.tsv", ERROR_COLUMNS)
        lost = [rid for rid, k in self._keys.items() if k not in self._rows]
        if lost:
            raise DataError(f"{len(lost)} record(s) point to texts no chunk holds (e.g. {lost[:3]}); "
                            "rerun embed-text", path=self.directory)
        self.ids = list(self._keys)

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
        return self._matrix[self._rows[self.text_sha256(record_id)]].copy()

    def has_text(self, text: str) -> bool:
        """Whether the exact string ``text`` has a cached target (lets callers detect a changed context)."""
        return text_key(text) in self._rows

    def get_text(self, text: str) -> np.ndarray:
        """The target of an exact context string, independent of record ids."""
        key = text_key(text)
        if key not in self._rows:
            raise DataError(f"no text target for this text (sha256 {key[:12]}...)", path=self.directory)
        return self._matrix[self._rows[key]].copy()

    def array(self, record_ids: Iterable[str] | None = None) -> tuple[list[str], np.ndarray]:
        ids = list(self.ids if record_ids is None else record_ids)
        rows = [self._rows[self.text_sha256(rid)] for rid in ids]
        return ids, self._matrix[rows].astype(np.float32, copy=True).reshape(len(ids), self.dim)


def read_text_targets(directory: str | os.PathLike, record_ids: Iterable[str] | None = None
                      ) -> tuple[list[str], np.ndarray]:
    """``(record_ids, targets (N, dim) float32)`` for all records of a store, or the ones asked for."""
    return TextTargetStore(directory).array(record_ids)
