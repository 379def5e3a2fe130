"""On-disk layout of the embedding store: the content-addressed cache and the readable view.

Why two layers: computing an embedding is expensive and its value depends only
on (audio bytes, front-end settings, encoder weights), so vectors live in a
*cache* keyed by exactly that and are shared by every run and manifest that
points at it. A run then writes a small *view* for its manifest: the record ids
in manifest order and one array, which is what downstream stages read.

Layout of a store directory ``DIR`` (``respiramfm embed --out DIR``)::

    DIR/index.json                 view: ids, meta (encoder, weights hash, frontend key, counts)
    DIR/embeddings-<id>.npy        (N, D) or (N, 64, D) float32, rows in ``ids`` order
    DIR/errors.tsv                 record_id, path, cause   (undecodable / missing files)
    DIR/skipped.tsv                record_id, reason        (records without audio)
    DIR/cache/file_hashes.json     memo: path -> size, mtime, sha256, duration
    DIR/cache/<group>/group.json   what the group holds (encoder, weights hash, frontend key, kind)
    DIR/cache/<group>/shard-*.safetensors   one per finished batch: tensors named by audio sha256,
                                   metadata ``failed`` = {sha256: cause} for undecodable files
    DIR/cache/<group>/index.json   shard -> keys, an accelerator for scanning (rebuilt if stale)

Every file is written atomically, so a killed run leaves whole shards or none;
``index.json`` names its array file, so view and array always agree.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from respiramfm.errors import DataError
from respiramfm.utils.io import atomic_path, atomic_write_json, atomic_write_text

VIEW_FORMAT = "respiramfm-embeddings/1"
SHARD_FORMAT = "respiramfm-embed-shard/1"


def group_id(encoder: str, weights_hash: str, frontend_key: str, kind: str) -> str:
    """Cache group of one (encoder, weights, front end, pooled|tokens) combination."""
    desc = json.dumps({"encoder": encoder, "weights": weights_hash, "frontend": frontend_key, "kind": kind},
                      sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()[:20]


def is_tmp_name(name: str) -> bool:
    """Leftover of an interrupted atomic write (``utils.io.atomic_path`` names)."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_stale_tmp(directory: Path, target: str | None = None) -> int:
    """Delete temporaries a killed run left behind (only those of ``target`` if given).

    Call only while holding the lock that every writer of those files holds.
    """
    n = 0
    if directory.is_dir():
        for entry in os.scandir(directory):
            if target is not None and not entry.name.startswith(f".{target}."):
                continue
            if entry.is_file() and is_tmp_name(entry.name):
                Path(entry.path).unlink(missing_ok=True)
                n += 1
    return n


def _clean(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------- cache


class CacheGroup:
    """The shards of one cache group, and what they contain."""

    def __init__(self, root: Path, gid: str, description: dict | None = None):
        self.dir = Path(root) / gid
        self.gid = gid
        if description is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / "group.json").exists():
                atomic_write_json(self.dir / "group.json", description)
        self.key_to_shard: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self._shards: dict[str, dict] = {}

    def scan(self) -> None:
        """Learn which keys are done, from ``index.json`` plus any shard it does not list."""
        from safetensors import safe_open

        listed: dict[str, dict] = {}
        index_path = self.dir / "index.json"
        if index_path.exists():
            try:
                listed = json.loads(index_path.read_text())["shards"]
            except (ValueError, KeyError, TypeError):
                listed = {}  # a damaged accelerator is rebuilt from the shards themselves
        shards: dict[str, dict] = {}
        if self.dir.is_dir():
            for entry in sorted(os.scandir(self.dir), key=lambda e: e.name):
                if not (entry.name.startswith("shard-") and entry.name.endswith(".safetensors")):
                    continue
                if entry.name in listed:
                    shards[entry.name] = listed[entry.name]
                    continue
                try:
                    with safe_open(entry.path, framework="np") as fh:
                        meta = fh.metadata() or {}
                        shards[entry.name] = {"keys": sorted(fh.keys()), "failed": json.loads(meta.get("failed", "{}"))}
                except Exception as exc:  # not ours or damaged: report, never trust it
                    raise DataError(f"unreadable cache shard ({exc})", path=entry.path) from None
        self._shards = shards
        self.key_to_shard = {}
        self.failed = {}
        for name, info in shards.items():
            for k in info["keys"]:
                self.key_to_shard[k] = name
            for k, cause in info["failed"].items():
                self.failed[k] = cause

    def write_index(self) -> None:
        atomic_write_json(self.dir / "index.json", {"format": SHARD_FORMAT, "shards": self._shards})

    def write_shard(self, arrays: dict[str, np.ndarray], failed: dict[str, str], writer: str = "") -> str:
        """Persist one finished batch atomically; the name derives from its keys.

        ``writer`` (e.g. ``"rank1/2"``) is provenance only; it never affects the vectors.
        """
        from safetensors.numpy import save_file

        keys = sorted(set(arrays) | set(failed))
        name = "shard-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24] + ".safetensors"
        meta = {"format": SHARD_FORMAT, "failed": json.dumps(failed, sort_keys=True), "writer": writer}
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
        with atomic_path(self.dir / name, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return name

    def shard_paths(self) -> list[Path]:
        return [self.dir / n for n in self._shards]


# ----------------------------------------------------------------------------- view


def write_tsv(path: Path, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(header)
    for row in rows:
        w.writerow([_clean(x) for x in row])
    atomic_write_text(path, buf.getvalue())


def read_tsv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def write_view(out_dir: Path, group: CacheGroup, ids: list[str], keys: list[str], item_shape: tuple[int, ...],
               meta: dict) -> Path:
    """Assemble ``embeddings-<id>.npy`` (rows in ``ids`` order) shard by shard, then ``index.json``.

    Only one shard is open at a time and rows go straight into a memory-mapped
    file, so memory stays bounded whatever the manifest size.
    """
    from safetensors import safe_open

    view_id = hashlib.sha256(("\n".join(f"{i}\t{k}" for i, k in zip(ids, keys)) + group.gid).encode()).hexdigest()[:16]
    array_name = f"embeddings-{view_id}.npy"
    rows_by_shard: dict[str, dict[str, list[int]]] = {}
    for row, key in enumerate(keys):
        rows_by_shard.setdefault(group.key_to_shard[key], {}).setdefault(key, []).append(row)
    shape = (len(ids), *item_shape)
    with atomic_path(out_dir / array_name, suffix=".npy") as tmp:
        if len(ids) == 0:  # a memory map cannot be empty; through a handle so np.save adds no suffix
            with open(tmp, "wb") as fh:
                np.save(fh, np.zeros(shape, dtype=np.float32))
        else:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            for shard, wanted in sorted(rows_by_shard.items()):
                with safe_open(str(group.dir / shard), framework="np") as fh:
                    for key, rows in wanted.items():
                        vec = fh.get_tensor(key)
                        if vec.shape != tuple(item_shape):
                            raise DataError(f"cached vector {key} has shape {vec.shape}, expected {item_shape}",
                                            path=group.dir / shard)
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

    @property
    def errors(self) -> list[dict[str, str]]:
        """Rows of ``errors.tsv``: record_id, path, cause."""
        return read_tsv(self.dir / "errors.tsv")

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Rows of ``skipped.tsv``: record_id, reason."""
        return read_tsv(self.dir / "skipped.tsv")


def read_embeddings(store_dir: str | os.PathLike, record_ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """All (or the given) record ids and their vectors, as an in-memory float32 array."""
    store = EmbeddingStore(store_dir)
    ids = list(store.ids if record_ids is None else record_ids)
    return ids, store.rows(ids)
