"""The readable view of an audio embedding store: one array in manifest order plus its index.

A run of ``respiramfm embed --out DIR`` keeps its vectors in the shared cache
(:mod:`respiramfm.cache.shards`) and writes a small *view* for its manifest,
which is what downstream stages read::

    DIR/index.json                 view: ids, meta (encoder, weights hash, frontend key, counts)
    DIR/embeddings-<id>.npy        (N, D) or (N, 64, D) float32, rows in ``ids`` order
    DIR/errors.tsv                 record_id, path, cause   (undecodable / missing files)
    DIR/skipped.tsv                record_id, reason        (records without audio)
    DIR/cache/file_hashes.json     memo: path -> size, mtime, sha256, duration
    DIR/cache/<group>/...          the vector cache (default location; ``--cache-dir`` moves it)

Every file is written atomically; ``index.json`` names its array file, so view
and array always agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors import safe_open

from respiramfm.cache.shards import VectorCache
from respiramfm.cache.tables import read_tsv
from respiramfm.errors import DataError
from respiramfm.utils.io import atomic_path, atomic_write_json

VIEW_FORMAT = "respiramfm-embeddings/1"


def write_view(out_dir: Path, cache: VectorCache, ids: list[str], keys: list[str], item_shape: tuple[int, ...],
               meta: dict) -> Path:
    """Assemble ``embeddings-<id>.npy`` (rows in ``ids`` order) shard by shard, then ``index.json``.

    Only one shard is open at a time and rows go straight into a memory-mapped
    file, so memory stays bounded whatever the manifest size.
    """
    out_dir = Path(out_dir)
    view_id = hashlib.sha256(("\n".join(f"{i}\t{k}" for i, k in zip(ids, keys)) + cache.gid).encode()).hexdigest()[:16]
    array_name = f"embeddings-{view_id}.npy"
    rows_by_shard: dict[str, dict[str, list[int]]] = {}
    for row, key in enumerate(keys):
        rows_by_shard.setdefault(cache.key_to_shard[key], {}).setdefault(key, []).append(row)
    shape = (len(ids), *item_shape)
    with atomic_path(out_dir / array_name, suffix=".npy") as tmp:
        if len(ids) == 0:  # a memory map cannot be empty; through a handle so np.save adds no suffix
            with open(tmp, "wb") as fh:
                np.save(fh, np.zeros(shape, dtype=np.float32))
        else:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            for shard, wanted in sorted(rows_by_shard.items()):
                with safe_open(str(cache.dir / shard), framework="np") as fh:
                    for key, rows in wanted.items():
                        vec = fh.get_tensor(key)
                        if vec.shape != tuple(item_shape):
                            raise DataError(f"cached vector {key} has shape {vec.shape}, expected {item_shape}",
                                            path=cache.dir / shard)
                        mm[rows] = vec
            mm.flush()
            del mm
    index = dict(meta, format=VIEW_FORMAT, embeddings_file=array_name, item_shape=list(item_shape),
                 ids=list(ids), audio_sha256=list(keys))
    atomic_write_json(out_dir / "index.json", index)
    for entry in os.scandir(out_dir):  # superseded arrays of earlier runs
        if entry.name.startswith("embeddings-") and entry.name.endswith(".npy") and entry.name != array_name:
            Path(entry.path).unlink(missing_ok=True)
    return out_dir / array_name


class EmbeddingStore:
    """Read side of a store directory written by ``respiramfm embed``.

    ``ids`` are the embedded record ids in manifest order, ``dim`` the vector
    width, ``meta`` the run description (encoder, weights_hash, frontend_key,
    frontend, kind, counts, ...). The array is memory-mapped, so opening a large
    store is cheap; :meth:`get` returns an owned copy.
    """

    def __init__(self, store_dir: str | os.PathLike):
        self.dir = Path(store_dir)
        index_path = self.dir / "index.json"
        if not index_path.exists():
            raise DataError("not an embedding store (no index.json); run `respiramfm embed` first", path=self.dir)
        try:
            index = json.loads(index_path.read_text())
        except ValueError as exc:
            raise DataError(f"index.json is not valid JSON ({exc})", path=index_path) from None
        if index.get("format") != VIEW_FORMAT:
            raise DataError(f"unsupported store format {index.get('format')!r}", path=index_path)
        array_path = self.dir / index["embeddings_file"]
        try:
            self.array = np.load(array_path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read embeddings ({exc})", path=array_path) from None
        self.ids: list[str] = list(index["ids"])
        expected = (len(self.ids), *index["item_shape"])
        if tuple(self.array.shape) != expected:
            raise DataError(f"array shape {self.array.shape} does not match index {expected}", path=array_path)
        self._row = {rid: i for i, rid in enumerate(self.ids)}
        self.audio_sha256: list[str] = list(index["audio_sha256"])
        self.meta: dict = {k: v for k, v in index.items() if k not in ("ids", "audio_sha256")}
        self.dim: int = int(index["item_shape"][-1])

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._row

    def get(self, record_id: str) -> np.ndarray:
        try:
            return np.array(self.array[self._row[record_id]])
        except KeyError:
            raise DataError(f"record {record_id!r} has no embedding in this store", path=self.dir) from None

    def rows(self, record_ids: Sequence[str]) -> np.ndarray:
        missing = [r for r in record_ids if r not in self._row]
        if missing:
            raise DataError(f"{len(missing)} record(s) have no embedding in this store, e.g. {missing[:5]}",
                            path=self.dir)
        idx = np.fromiter((self._row[r] for r in record_ids), dtype=np.int64, count=len(record_ids))
        return np.array(self.array[idx]) if len(idx) else np.zeros((0, *self.array.shape[1:]), np.float32)

    def cache(self) -> VectorCache:
        """The content-addressed cache this view was assembled from: look up any audio by its sha256."""
        rel = self.meta.get("cache_dir")
        if not rel:
            raise DataError("this store does not name its cache directory", path=self.dir)
        return VectorCache(self.dir / rel, scan=True)

    @property
    def errors(self) -> list[dict[str, str]]:
        """Rows of ``errors.tsv``: record_id, path, cause."""
        return read_tsv(self.dir / "errors.tsv")

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Rows of ``skipped.tsv``: record_id, reason."""
        return read_tsv(self.dir / "skipped.tsv")


def read_embeddings(store_dir: str | os.PathLike,
                    record_ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """All (or the given) record ids and their vectors, as an in-memory float32 array."""
    store = EmbeddingStore(store_dir)
    ids = list(store.ids if record_ids is None else record_ids)
    return ids, store.rows(ids)
