"""Stage-1 training data: cached (audio embedding, text target) pairs joined by record id.

Both towers are frozen, so training needs only the two caches plus the manifest
(for splits, patients, contexts and diagnoses). Everything is held as in-memory
tensors; :mod:`respiramfm.align.train` shuffles indices, never a DataLoader.

Splits are patient-level and come from the manifest's ``split`` column:

* ``train`` (and unassigned ``""``) rows form the training pool, ``val`` rows the
  validation set; ``test`` rows are never read from either store.
* If no ``val`` row exists, whole training patients are dealt to validation with
  :func:`respiramfm.data.splits.assign_splits` (per dataset, stratified by diagnosis,
  ``val_fraction`` of the patients, a fixed seed so every training seed sees the same
  validation set).
* A patient present in two splits is an error (:class:`~respiramfm.errors.DataError`).

**Which datasets.** By default stage 1 aligns on the datasets of the run's supervised tasks
(:func:`respiramfm.data.roles.run_tasks`: the task files' tasks, else T1-T9), never on every
dataset of the manifest; ``datasets`` overrides. A manifest that holds train/val/unassigned rows
of a dataset the run uses only for zero-shot tasks is refused
(:class:`~respiramfm.data.roles.ZeroShotLeakError`), whatever ``datasets`` says.

Records the stores cannot serve (no audio, no vector, non-finite vector) are skipped
and reported, never silently dropped.

Text ids mark identical targets: records whose context strings are equal share an id
(used by the duplicate-aware loss and by retrieval, where a hit means the retrieved text
equals the true text). Records without a context fall back to the exact bytes of their
text vector.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from respiramfm.data.records import read_manifest
from respiramfm.data.roles import refuse_zero_shot_rows, run_tasks, supervised_datasets
from respiramfm.data.splits import is_simulated, patient_label, split_records
from respiramfm.cache.view import EmbeddingStore
from respiramfm.errors import ConfigError, DataError
from respiramfm.llm.text_store import TextTargetStore


@dataclass
class PairSet:
    """Aligned rows of one split: ``audio[i]`` and ``text[i]`` belong to ``record_ids[i]``."""

    record_ids: list[str]
    patient_ids: list[str]
    diagnoses: list[str]
    audio: torch.Tensor
    text: torch.Tensor
    text_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.record_ids)

    def to(self, device: str | torch.device) -> "PairSet":
        return PairSet(self.record_ids, self.patient_ids, self.diagnoses, self.audio.to(device),
                       self.text.to(device), self.text_ids.to(device))


@dataclass
class AlignData:
    train: PairSet
    val: PairSet
    val_source: str = "manifest"            # "manifest" | "carved"
    skipped: list[dict] = field(default_factory=list)   # {"record_id", "split", "reason"}
    audio_meta: dict = field(default_factory=dict)
    text_meta: dict = field(default_factory=dict)
    simulated: bool = False
    datasets: list[str] = field(default_factory=list)   # the datasets aligned on
    datasets_from: str = "config"                       # "config" | "supervised tasks"

    @property
    def audio_dim(self) -> int:
        return int(self.train.audio.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.train.text.shape[1])

    def fingerprint(self) -> str:
        """Hash of ids and vectors, so a resumed run can prove it sees the same data."""
        h = hashlib.sha256()
        for part in (self.train, self.val):
            h.update("\n".join(part.record_ids).encode() + b"\0")
            for t in (part.audio, part.text, part.text_ids):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def assign_text_ids(contexts: Sequence[str], text: np.ndarray) -> np.ndarray:
    """Integer id per row; equal ids = identical context (or identical vector when no context)."""
    seen: dict[object, int] = {}
    out = np.empty(len(contexts), dtype=np.int64)
    for i, ctx in enumerate(contexts):
        key: object = ("ctx", ctx) if ctx else ("vec", np.ascontiguousarray(text[i], dtype=np.float32).tobytes())
        out[i] = seen.setdefault(key, len(seen))
    return out


def pairset_from_arrays(audio: np.ndarray, text: np.ndarray, record_ids: Sequence[str] | None = None,
                        patient_ids: Sequence[str] | None = None, diagnoses: Sequence[str] | None = None,
                        text_ids: np.ndarray | None = None, contexts: Sequence[str] | None = None) -> PairSet:
    """Build a split from arrays (benchmarks, tests, callers with their own caches)."""
    audio = np.asarray(audio, dtype=np.float32)
    text = np.asarray(text, dtype=np.float32)
    n = audio.shape[0]
    if audio.ndim != 2 or text.ndim != 2 or text.shape[0] != n:
        raise DataError(f"audio {audio.shape} and text {text.shape} must be 2-D with the same number of rows")
    rids = list(record_ids) if record_ids is not None else [f"r{i}" for i in range(n)]
    pids = list(patient_ids) if patient_ids is not None else list(rids)
    diag = list(diagnoses) if diagnoses is not None else [""] * n
    if text_ids is None:
        text_ids = assign_text_ids(list(contexts) if contexts is not None else [""] * n, text)
    return PairSet(rids, pids, diag, torch.from_numpy(audio.copy()), torch.from_numpy(text.copy()),
                   torch.as_tensor(np.asarray(text_ids, dtype=np.int64)))


def _store_rows(kind: str, store, store_dir: str, records: list, split: str,
                skipped: list[dict]) -> tuple[list, np.ndarray]:
    """Vectors for the records the store holds (only those rows are read); the rest go to ``skipped``."""
    keep = []
    for r in records:
        if r.record_id in store:
            keep.append(r)
        else:
            skipped.append({"record_id": r.record_id, "split": split, "reason": f"no {kind} in store"})
    ids = [r.record_id for r in keep]
    arr = store.rows(ids) if kind == "audio embedding" else store.array(ids)[1]
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != len(keep):
        raise DataError(f"{kind} store gave an array of shape {arr.shape} for {len(keep)} records; stage 1 needs "
                        "one pooled vector per record (not a token grid)", path=store_dir)
    return keep, arr


def _build_split(records: list, split: str, audio_dir: str, text_dir: str, skipped: list[dict],
                 stores: tuple) -> tuple[list, np.ndarray, np.ndarray]:
    audio_store, text_store = stores
    recs = []
    for r in records:
        if not r.has_audio:
            skipped.append({"record_id": r.record_id, "split": split, "reason": "record has no audio"})
        else:
            recs.append(r)
    recs, audio = _store_rows("audio embedding", audio_store, audio_dir, recs, split, skipped)
    pos = {r.record_id: i for i, r in enumerate(recs)}
    recs2, text = _store_rows("text target", text_store, text_dir, recs, split, skipped)
    audio = audio[[pos[r.record_id] for r in recs2]] if recs2 else audio[:0]
    finite = np.isfinite(audio).all(axis=1) & np.isfinite(text).all(axis=1)
    for r, ok in zip(recs2, finite):
        if not ok:
            skipped.append({"record_id": r.record_id, "split": split, "reason": "non-finite vector"})
    keep = [r for r, ok in zip(recs2, finite) if ok]
    return keep, audio[finite], text[finite]


def align_datasets(records: list, tasks: list, datasets: Sequence[str], manifest: str) -> tuple[list[str], str]:
    """(datasets to align on, where they came from): ``datasets``, else the supervised tasks' ones present."""
    if datasets:
        return sorted(datasets), "config"
    wanted = supervised_datasets(tasks)
    present = sorted(set(wanted) & {r.dataset for r in records if r.split != "test"})
    if not present:
        raise DataError(f"the manifest holds no train/val records of the supervised tasks' datasets {wanted}; "
                        "pass the run's task files (task_files=[...]) or name datasets=[...]", path=manifest)
    return present, "supervised tasks"


def load_align_data(manifest: str, audio_store: str, text_store: str, val_fraction: float = 0.15,
                    datasets: Sequence[str] = (), tasks: Sequence | None = None) -> AlignData:
    """Join manifest, audio store and text store into train/val pair sets (test rows untouched).

    ``tasks``: the run's tasks (default :func:`~respiramfm.data.roles.run_tasks`, the built-in ones).
    """
    for name, value in (("manifest", manifest), ("audio_store", audio_store), ("text_store", text_store)):
        if not value:
            raise ConfigError(f"{name} is not set")
    records = read_manifest(manifest)
    tasks = list(tasks) if tasks is not None else run_tasks()
    refuse_zero_shot_rows(records, tasks, stage="align", path=manifest)
    datasets, origin = align_datasets(records, tasks, datasets, manifest)
    train_recs, val_recs, source = split_records(records, val_fraction, datasets)
    stores = (EmbeddingStore(audio_store), TextTargetStore(text_store))
    skipped: list[dict] = []
    tr, tr_a, tr_t = _build_split(train_recs, "train", audio_store, text_store, skipped, stores)
    va, va_a, va_t = _build_split(val_recs, "val", audio_store, text_store, skipped, stores)
    if not tr or not va:
        raise DataError(f"no usable training ({len(tr)}) or validation ({len(va)}) pairs after joining the stores; "
                        f"{len(skipped)} record(s) skipped", path=manifest)
    ids = assign_text_ids([r.context for r in tr + va], np.concatenate([tr_t, va_t]))
    parts = []
    for recs, a, t, tid in ((tr, tr_a, tr_t, ids[: len(tr)]), (va, va_a, va_t, ids[len(tr):])):
        parts.append(pairset_from_arrays(a, t, [r.record_id for r in recs], [patient_label(r) for r in recs],
                                         [r.diagnosis for r in recs], text_ids=tid))
    return AlignData(parts[0], parts[1], source, skipped, dict(stores[0].meta), dict(stores[1].meta),
                     is_simulated(tr + va), datasets, origin)
