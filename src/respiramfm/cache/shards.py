"""A content-addressed, sharded cache of float32 vectors: the one store behind ``embed`` and ``embed-text``.

A cache directory holds the vectors of one *group*: values that are comparable
because they were computed the same way (same encoder weights and front end, or
same LLM, target space and token limit). Keys are content hashes (sha256 of the
audio bytes, or of the context text), so a value is computed once and found
again by any run, manifest or experiment that points at the directory.

Layout of a cache directory::

    group.json                  what the group holds (written once, by the first run)
    shard-<hash>.safetensors    one per finished batch: one tensor per key, metadata
                                ``failed`` = {key: cause} for inputs that could not be embedded
    index.json                  shard -> keys and size; an accelerator, rebuilt when stale

Resumable: each finished batch is one shard written atomically, so a killed run
loses at most the batches in flight and a rerun skips every key a shard holds.
A shard's name derives from its keys only, so one batch plan gives the same
shard names whether it ran in one process, in several, or resumed.
Memory-mapped: values are read through safetensors' memory map, a shard at a time.

Public API (stable; the input processor and both embed commands use it):
:meth:`VectorCache.put`, :meth:`VectorCache.get`, :meth:`VectorCache.lookup`,
``key in cache``, :func:`group_id`, :func:`content_key`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from respiramfm.errors import DataError
from respiramfm.utils.io import atomic_path, atomic_write_json

SHARD_FORMAT = "respiramfm-embed-shard/1"


def content_key(data: bytes | str) -> str:
    """The cache key of a content: sha256 hex of its bytes (text as UTF-8)."""
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def group_id(**identity: object) -> str:
    """A short, stable directory name for one group, derived from what makes its values comparable."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def is_tmp_name(name: str) -> bool:
    """Leftover of an interrupted atomic write (``utils.io.atomic_path`` names)."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_stale_tmp(directory: Path, target: str | None = None) -> int:
    """Delete temporaries a killed run left behind (only those of ``target`` if given).

    Call only while holding the lock that every writer of those files holds.
    """
    n = 0
    if Path(directory).is_dir():
        for entry in os.scandir(directory):
            if target is not None and not entry.name.startswith(f".{target}."):
                continue
            if entry.is_file() and is_tmp_name(entry.name):
                Path(entry.path).unlink(missing_ok=True)
                n += 1
    return n


class VectorCache:
    """The shards of one cache directory and the keys they hold.

    ``description`` (first writer only) is stored as ``group.json``. Call
    :meth:`scan` to (re)learn the directory's content after other processes wrote to it.
    """

    def __init__(self, directory: str | os.PathLike, description: dict | None = None, scan: bool = False):
        self.dir = Path(directory)
        if description is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / "group.json").exists():
                atomic_write_json(self.dir / "group.json", description)
        self.key_to_shard: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self._shards: dict[str, dict] = {}
        if scan:
            self.scan()

    @property
    def gid(self) -> str:
        return self.dir.name

    # ------------------------------------------------------------------ read

    def __contains__(self, key: object) -> bool:
        return key in self.key_to_shard

    def __len__(self) -> int:
        return len(self.key_to_shard)

    def keys(self) -> list[str]:
        return list(self.key_to_shard)

    def get(self, key: str) -> np.ndarray:
        """The vector stored under ``key`` (an owned float32 array)."""
        found = self.lookup([key])
        if key not in found:
            why = self.failed.get(key)
            raise DataError(f"no cached vector for key {key[:12]}..." + (f" ({why})" if why else ""), path=self.dir)
        return found[key]

    def lookup(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """``{key: vector}`` for the keys the cache holds; absent keys are left out. One shard open at a time."""
        by_shard: dict[str, list[str]] = {}
        for k in dict.fromkeys(keys):
            if k in self.key_to_shard:
                by_shard.setdefault(self.key_to_shard[k], []).append(k)
        out: dict[str, np.ndarray] = {}
        for shard, wanted in sorted(by_shard.items()):
            path = self.dir / shard
            try:
                with safe_open(str(path), framework="np") as fh:
                    for k in wanted:
                        out[k] = np.asarray(fh.get_tensor(k), dtype=np.float32)
            except Exception as exc:  # safetensors raises several exception types for damaged files
                raise DataError(f"damaged cache shard ({exc}); delete it and rerun", path=path) from None
        return out

    def scan(self) -> None:
        """Learn which keys are done, from ``index.json`` plus any shard it does not list (or lists stale)."""
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
                size = entry.stat().st_size
                known = listed.get(entry.name)
                if isinstance(known, dict) and known.get("size") == size:
                    shards[entry.name] = known
                    continue
                shards[entry.name] = dict(self._read_header(Path(entry.path)), size=size)
        self._shards = shards
        self.key_to_shard = {}
        self.failed = {}
        for name, info in shards.items():
            for k in info["keys"]:
                self.key_to_shard[k] = name
            for k, cause in info["failed"].items():
                self.failed[k] = cause

    @staticmethod
    def _read_header(path: Path) -> dict:
        try:
            with safe_open(str(path), framework="np") as fh:
                meta = fh.metadata() or {}
                return {"keys": sorted(fh.keys()), "failed": json.loads(meta.get("failed", "{}"))}
        except Exception as exc:  # not ours or damaged: report, never trust it
            raise DataError(f"damaged cache shard ({exc}); delete it and rerun", path=path) from None

    def shard_paths(self) -> list[Path]:
        return [self.dir / n for n in self._shards]

    # ----------------------------------------------------------------- write

    def put(self, arrays: dict[str, np.ndarray], failed: dict[str, str] | None = None, writer: str = "") -> str:
        """Persist one finished batch as one shard, atomically; return the shard's name.

        ``failed`` remembers inputs that cannot be embedded (so a resume does not
        retry them); ``writer`` (e.g. ``"rank1/2"``) is provenance only.
        """
        failed = dict(failed or {})
        keys = sorted(set(arrays) | set(failed))
        name = "shard-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24] + ".safetensors"
        meta = {"format": SHARD_FORMAT, "failed": json.dumps(failed, sort_keys=True), "writer": writer}
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
        with atomic_path(self.dir / name, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        info = {"keys": sorted(arrays), "failed": failed, "size": (self.dir / name).stat().st_size}
        self._shards[name] = info
        for k in info["keys"]:
            self.key_to_shard[k] = name
        for k, cause in failed.items():
            self.failed[k] = cause
        return name

    def write_index(self) -> None:
        """Record what :meth:`scan` found, so the next scan opens only new shards."""
        atomic_write_json(self.dir / "index.json", {"format": SHARD_FORMAT, "shards": self._shards})
