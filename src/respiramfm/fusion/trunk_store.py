"""The on-disk store of the frozen-trunk cache: variable-length ``(L, H)`` arrays keyed by content.

One append-only float file (``states.bin``) read back memory-mapped, an index
(``index.json``: key -> row offset, row count, parent key) written atomically after
each appended batch, and ``meta.json`` naming what the states depend on. An entry may
name a parent whose rows come first: every record of a prompt stores only its own
tokens after the prompt, and the prompt's rows are stored once.

A build killed between writing rows and publishing the index leaves a torn tail,
which is cut off when the store is opened again, so a build resumes from the last
indexed record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from respiramfm.errors import CheckpointError, DataError
from respiramfm.utils.io import atomic_write_json

FORMAT = "respiramfm-trunk-cache"


class TrunkStore:
    """Append-only, memory-mapped store of variable-length ``(L, H)`` float arrays keyed by content."""

    def __init__(self, directory: str | os.PathLike, identity: dict, hidden_size: int, dtype: torch.dtype):
        self.dir = Path(directory)
        self.hidden_size = int(hidden_size)
        self.np_dtype = np.dtype(str(dtype).replace("torch.", "").replace("bfloat16", "uint16"))
        self.torch_dtype = dtype
        self.data_path, self.index_path, self.meta_path = (self.dir / "states.bin", self.dir / "index.json",
                                                           self.dir / "meta.json")
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "identity": identity, "hidden_size": self.hidden_size, "dtype": str(dtype)}
        if self.meta_path.is_file():
            try:
                found = json.loads(self.meta_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"unreadable trunk-cache metadata ({exc.msg})", path=self.meta_path) from None
            if found != json.loads(json.dumps(meta, default=str)):
                raise CheckpointError("trunk-cache folder belongs to another model or cut", path=self.meta_path)
        else:
            atomic_write_json(self.meta_path, meta)
        self.index: dict[str, list] = {}
        if self.index_path.is_file():
            try:
                self.index = json.loads(self.index_path.read_text(encoding="utf-8"))["records"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"unreadable trunk-cache index ({exc})", path=self.index_path) from None
        self.rows = max((e[0] + e[1] for e in self.index.values()), default=0)
        row_bytes = self.hidden_size * self.np_dtype.itemsize
        size = self.data_path.stat().st_size if self.data_path.exists() else 0
        if size > self.rows * row_bytes:
            os.truncate(self.data_path, self.rows * row_bytes)  # torn tail of an interrupted append
        elif size < self.rows * row_bytes:
            raise CheckpointError("trunk-cache data is shorter than its index", path=self.data_path)
        self._map: np.memmap | None = None

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return self.rows * self.hidden_size * self.np_dtype.itemsize

    def append(self, items: dict[str, torch.Tensor], parent: str = "") -> None:
        """Write new ``key -> (L, H)`` arrays (rows that follow ``parent``'s), then publish them in the index."""
        if parent and parent not in self.index:
            raise DataError(f"trunk-cache parent {parent[:12]} is not stored", path=self.dir)
        new = {k: v for k, v in items.items() if k not in self.index}
        if not new:
            return
        with open(self.data_path, "ab") as fh:
            for key, value in new.items():
                arr = value.detach().cpu().to(self.torch_dtype).contiguous()
                if arr.ndim != 2 or arr.shape[1] != self.hidden_size:
                    raise DataError(f"trunk state {key[:12]} has shape {tuple(arr.shape)}")
                fh.write(arr.view(torch.uint16).numpy().tobytes() if arr.dtype == torch.bfloat16
                         else arr.numpy().tobytes())
                self.index[key] = [self.rows, int(arr.shape[0]), parent]
                self.rows += int(arr.shape[0])
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write_json(self.index_path, {"format": FORMAT, "records": self.index})
        self._map = None

    def _rows(self, key: str) -> np.ndarray:
        if self._map is None or self._map.shape[0] < self.rows:
            self._map = np.memmap(self.data_path, dtype=self.np_dtype, mode="r", shape=(self.rows, self.hidden_size))
        offset, n = self.index[key][:2]
        return self._map[offset:offset + n]

    def get(self, key: str) -> torch.Tensor:
        """The stored ``(L, H)`` array, parent rows first (a copy: training never writes into the map)."""
        if key not in self.index:
            raise DataError(f"trunk state {key[:12]} is not in the cache; build it first", path=self.dir)
        parent = self.index[key][2] if len(self.index[key]) > 2 else ""
        rows = self._rows(key)
        t = torch.from_numpy(np.concatenate([self._rows(parent), rows]) if parent else np.array(rows))
        return t.view(torch.bfloat16) if self.torch_dtype == torch.bfloat16 else t


__all__ = ["FORMAT", "TrunkStore"]
