"""Stage-2 training data: (record, task) examples, cached once, batched by length and task.

**Test records never enter training**, and neither does any record of a dataset the run uses
only for zero-shot tasks (:mod:`respiramfm.data.roles`: refused unless it is all test).
:func:`load_finetune_data` drops every ``split == "test"`` row right after reading the manifests (it only checks, from
the split column, that no patient straddles splits) and returns a
:class:`FinetuneData` holding exactly two example sets: ``train`` (what the
optimiser sees) and ``val`` (what selects the checkpoint). There is no third.
Without ``val`` rows, whole training patients are carved off for validation by
:func:`respiramfm.data.splits.split_records` (patient-level, fixed seed).

**Everything constant is computed once** (:func:`prepare_examples`): the projector is
frozen, so every audio embedding is projected once into the LLM's space; the prompt
of each (task, modality) is tokenised once and every distinct context once. The hot
loop only pads token ids that already exist (:func:`resolved_items`).

**Batches** (:func:`plan_epoch`) are built from *step batches*, the examples of one
optimiser step across all processes and accumulation rounds (``batch_size x
grad_accum x world``), so the trajectory is the same for 1 process with batch 4 and 2
processes with batch 2, and for accumulation 2 x 2 and batch 4. Step batches are
task-homogeneous by default (every sample shares its prompt, which training then runs
once per micro-batch, see :mod:`respiramfm.fusion.infer`) and length-grouped (examples
are sorted by length inside shuffled windows, so padding stays small). Task mixing:

* ``concat`` (official): each example once per epoch, step batches in random order;
* ``proportional`` (RespLLM): each step draws a task with probability proportional to
  its number of step batches; the epoch ends when the first task runs out;
* ``balanced``: each step draws a task uniformly (a task that runs out is reshuffled);
  the epoch has as many steps as ``concat``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from respiramfm.data.records import read_manifest
from respiramfm.data.roles import refuse_zero_shot_rows, run_tasks
from respiramfm.data.splits import check_no_leakage, is_simulated, patient_label, split_records
from respiramfm.data.task_defs import TASKS
from respiramfm.data.tasks import get_task, load_tasks_yaml
from respiramfm.errors import ConfigError, DataError
from respiramfm.models.processing import InputProcessor, record_context
from respiramfm.models.sequence import ResolvedItem

MIXINGS = ("concat", "proportional", "balanced")
LENGTH_WINDOW = 32  # step batches per length-sorting window


@dataclass(frozen=True)
class Example:
    """One (record, task) pair; ``row`` indexes the split's audio array (None: no audio)."""

    record_id: str
    patient: str
    task: str
    label: int
    audio_type: str
    context: str
    row: int | None


@dataclass
class ExampleSet:
    split: str                 # "train" or "val" — never "test"
    examples: list[Example]
    audio: np.ndarray          # (n_rows, in_dim) or (n_rows, n_tokens, in_dim) encoder embeddings

    def __len__(self) -> int:
        return len(self.examples)

    def task_names(self) -> list[str]:
        return sorted({e.task for e in self.examples})


@dataclass
class FinetuneData:
    train: ExampleSet
    val: ExampleSet
    tasks: dict                # name -> Task, the tasks trained on
    skipped: list[dict] = field(default_factory=list)   # {"record_id", "split", "reason"}
    audio_meta: dict = field(default_factory=dict)
    val_source: str = "manifest"
    simulated: bool = False

    def fingerprint(self) -> str:
        """Hash of examples and vectors, so a resumed run can prove it sees the same data."""
        h = hashlib.sha256()
        for part in (self.train, self.val):
            for e in part.examples:
                h.update(f"{e.record_id}|{e.task}|{e.label}|{e.row}|{e.context}\n".encode())
            h.update(np.ascontiguousarray(part.audio, dtype=np.float32).tobytes())
        return h.hexdigest()


def _processor(dirs: Sequence[str]) -> InputProcessor:
    """The input processor over the audio stores (their vectors must all have one shape)."""
    processor = InputProcessor(stores=dirs)
    dims = {tuple(s.array.shape[1:]) for s in processor.stores}
    if len(dims) > 1:
        raise DataError(f"audio stores hold vectors of different shapes {sorted(dims)}", path=str(dirs[0]))
    return processor


def _examples(records: list, tasks: list, split: str, processor: InputProcessor | None,
              skipped: list[dict]) -> ExampleSet:
    """Examples of ``tasks``; with a processor every example needs a stored embedding (else it is skipped)."""
    rows: dict[str, int] = {}
    vectors: list[np.ndarray] = []
    out: list[Example] = []
    for task in tasks:
        for rec, label in task.select(records):
            row = rows.get(rec.record_id)
            if row is None and processor is not None:
                item, reason = processor.record_item(task, rec)
                if item is None:
                    skipped.append({"record_id": rec.record_id, "split": split, "task": task.name, "reason": reason})
                    continue
                row = rows[rec.record_id] = len(vectors)
                vectors.append(item.audio)
            out.append(Example(rec.record_id, patient_label(rec), task.name, int(label),
                               rec.audio_type or task.audio_type, record_context(rec), row))
    stores = processor.stores if processor is not None else []
    shape = tuple(stores[0].array.shape[1:]) if stores else (0,)
    audio = np.stack(vectors) if vectors else np.zeros((0, *shape), np.float32)
    return ExampleSet(split, out, audio)


def build_examples(records: list, tasks: list, split: str, audio_stores: Sequence[str] | None,
                   skipped: list[dict] | None = None) -> ExampleSet:
    """Examples of ``tasks`` over ``records``; with ``audio_stores`` every example needs a stored embedding.

    Records that cannot be used are appended to ``skipped`` with the reason.
    """
    processor = _processor(audio_stores) if audio_stores is not None else None
    return _examples(records, tasks, split, processor, skipped if skipped is not None else [])


def default_tasks(task_files: Sequence[str]) -> list[str]:
    """Supervised tasks: those of the given task files if any, else the built-in ones (T1-T4)."""
    if task_files:
        loaded = [t for f in task_files for t in load_tasks_yaml(f, overwrite=True)]
        return [t.name for t in loaded if t.role == "supervised"]
    # the paper's built-in tasks only, whatever else this process has registered
    return sorted(t.name for t in TASKS if t.role == "supervised")


def load_finetune_data(manifests: Sequence[str], audio_stores: Sequence[str], task_names: Sequence[str],
                       task_files: Sequence[str] = (), val_fraction: float = 0.15,
                       need_audio: bool = True, stage: str = "finetune") -> FinetuneData:
    """Train/val examples of ``task_names`` (empty: :func:`default_tasks`); test rows are dropped on read.

    Train/val rows of a dataset the run uses only for zero-shot tasks are refused
    (:func:`~respiramfm.data.roles.refuse_zero_shot_rows`, naming ``stage``).
    """
    if not manifests:
        raise ConfigError("no manifest given (manifests=[...])")
    if need_audio and not audio_stores:
        raise ConfigError("no audio store given (audio_store=DIR); only fusion.mode=text_only trains without one")
    for f in task_files:
        load_tasks_yaml(f, overwrite=True)
    names = list(task_names) or default_tasks(task_files)
    explicit = bool(task_names)
    tasks = [get_task(n) for n in names]
    records, seen = [], {}
    for m in manifests:
        for r in read_manifest(m):
            if r.record_id in seen:
                raise DataError(f"record id {r.record_id!r} appears in {seen[r.record_id]} and {m}", path=m)
            seen[r.record_id] = m
            records.append(r)
    check_no_leakage(records)  # reads only the split column of test rows
    refuse_zero_shot_rows(records, run_tasks(task_files, names), stage=stage, path=manifests[0])
    records = [r for r in records if r.split != "test"]  # ---- test data ends here ----
    datasets = {t.dataset for t in tasks}
    present = {r.dataset for r in records} & datasets
    if not present:
        raise DataError(f"the manifests hold no train/val records of the tasks' datasets {sorted(datasets)}",
                        path=manifests[0])
    train_recs, val_recs, source = split_records(records, val_fraction, sorted(present))
    processor = _processor(audio_stores) if need_audio else None
    skipped: list[dict] = []
    train = _examples(train_recs, tasks, "train", processor, skipped)
    val = _examples(val_recs, tasks, "val", processor, skipped)
    used = set(train.task_names())
    missing = [t.name for t in tasks if t.name not in used]
    if explicit and missing:
        raise DataError(f"task(s) {missing} have no usable training examples", path=manifests[0])
    if not train.examples or not val.examples:
        raise DataError(f"no usable training ({len(train)}) or validation ({len(val)}) examples; "
                        f"{len(skipped)} skipped", path=manifests[0])
    for t in missing:  # default selection: a supervised task without data (e.g. T3 TBscreen) is reported
        skipped.append({"record_id": "", "split": "train", "task": t, "reason": "task has no training data"})
    meta = dict(processor.stores[0].meta) if processor is not None and processor.stores else {}
    return FinetuneData(train, val, {t.name: t for t in tasks if t.name in used}, skipped, meta, source,
                        is_simulated(train_recs + val_recs))


# --------------------------------------------------------------------------- cached model inputs


@dataclass
class Prepared:
    """Model-ready examples: token ids and projected audio, computed once."""

    prompts: list[tuple[int, ...]]     # per example (shared tuples: one object per distinct prompt)
    contexts: list[tuple[int, ...]]    # per example (empty when the mode ignores context)
    audio: torch.Tensor | None         # (n_rows, n_tokens, H) projected, or None (text-only)
    rows: list[int | None]             # per example, row into ``audio``
    labels: torch.Tensor               # (N,) long
    tasks: list[str]
    lengths: np.ndarray                # (N,) total tokens of each sample

    def __len__(self) -> int:
        return len(self.prompts)


def prepare_examples(model, examples: ExampleSet, project_batch: int = 1024) -> Prepared:
    """Tokenise prompts and contexts once (memoised by text) and project the audio once."""
    mode = model.cfg.mode
    use_audio = mode != "text_only"
    audio = None
    if use_audio and len(examples.audio):
        raw = torch.from_numpy(np.ascontiguousarray(examples.audio, dtype=np.float32))
        if raw.ndim == 2:
            raw = raw.unsqueeze(1)
        if raw.shape[1:] != (model.cfg.n_audio_tokens, model.in_dim):
            raise DataError(f"audio embeddings have shape {tuple(raw.shape[1:])}, the model expects "
                            f"({model.cfg.n_audio_tokens}, {model.in_dim})")
        audio = torch.cat([model.project_audio(raw[i:i + project_batch])
                           for i in range(0, raw.shape[0], project_batch)]).detach()
    prompt_memo: dict[tuple, tuple[int, ...]] = {}
    context_memo: dict[str, tuple[int, ...]] = {}
    prompts, contexts, rows, lengths = [], [], [], []
    for e in examples.examples:
        has_audio = use_audio and e.row is not None
        key = (e.task, e.audio_type, has_audio)
        if key not in prompt_memo:
            prompt_memo[key] = tuple(model.prompt_ids(e.task, e.audio_type, with_audio=has_audio))
        ctx: tuple[int, ...] = ()
        if mode != "audio_only":
            if e.context not in context_memo:
                context_memo[e.context] = tuple(model.tokenize_context(e.context))
            ctx = context_memo[e.context]
        if not has_audio and not ctx:
            raise DataError(f"example {e.record_id} ({e.task}) has neither audio nor context in mode {mode}")
        prompts.append(prompt_memo[key])
        contexts.append(ctx)
        rows.append(e.row if has_audio else None)
        lengths.append(len(prompt_memo[key]) + len(ctx) + (model.cfg.n_audio_tokens if has_audio else 0))
    labels = torch.tensor([e.label for e in examples.examples], dtype=torch.long)
    return Prepared(prompts, contexts, audio, rows, labels, [e.task for e in examples.examples],
                    np.asarray(lengths, dtype=np.int64))


def resolved_items(model, prep: Prepared, indices: Sequence[int]) -> list:
    """``ResolvedItem`` objects (the model's collate input) whose audio is already projected.

    Mirrors :meth:`RespiraMFM.resolve` for cached inputs: segments in ``cfg.order``,
    an empty context segment dropped, audio only where the example has it.
    """
    order = model.cfg.order
    out = []
    for i in indices:
        row = prep.rows[i]
        parts = {"prompt": prep.prompts[i]}
        if prep.contexts[i]:
            parts["context"] = prep.contexts[i]
        if row is not None:
            parts["audio"] = prep.audio[row]
        segments = [(k, parts[k]) for k in order if k in parts]
        modalities = tuple(m for m in ("audio", "context") if m in parts)
        out.append(ResolvedItem(segments=segments, modalities=modalities, label=int(prep.labels[i])))
    return out


# --------------------------------------------------------------------------- batch planning


def _length_grouped(idx: np.ndarray, lengths: np.ndarray, step_size: int, rng: np.random.Generator,
                    group: bool) -> list[np.ndarray]:
    """Cut a shuffled index array into step batches; with ``group``, sort by length inside windows."""
    idx = idx[rng.permutation(len(idx))]
    if group:
        window = step_size * LENGTH_WINDOW
        parts = [idx[s:s + window] for s in range(0, len(idx), window)]
        idx = np.concatenate([p[np.argsort(-lengths[p], kind="stable")] for p in parts]) if parts else idx
    return [idx[s:s + step_size] for s in range(0, len(idx), step_size)]


def plan_epoch(tasks: Sequence[str], lengths: np.ndarray, step_size: int, mixing: str, seed: int, epoch: int,
               group_by_task: bool = True, group_by_length: bool = True, min_size: int = 1) -> list[np.ndarray]:
    """The step batches (global example indices) of one epoch: a pure function of its arguments.

    Step batches smaller than ``min_size`` (processes x accumulation rounds, so that every
    micro-batch holds at least one example) are dropped; they are at most one per task and
    a different set each epoch.
    """
    if mixing not in MIXINGS:
        raise ConfigError(f"task mixing must be one of {MIXINGS}, got {mixing!r}")
    if mixing != "concat" and not group_by_task:
        raise ConfigError(f"mixing {mixing!r} draws one task per step; it needs group_by_task=true")
    rng = np.random.default_rng([int(seed), int(epoch), 7])
    names = sorted(set(tasks))
    task_arr = np.asarray(tasks)
    if group_by_task:
        per_task = {t: [b for b in _length_grouped(np.flatnonzero(task_arr == t), lengths, step_size, rng,
                                                   group_by_length) if len(b) >= min_size] for t in names}
    else:
        pool = [b for b in _length_grouped(np.arange(len(tasks)), lengths, step_size, rng, group_by_length)
                if len(b) >= min_size]
        return [pool[i] for i in rng.permutation(len(pool))]
    if mixing == "concat":
        pool = [b for t in names for b in per_task[t]]
        return [pool[i] for i in rng.permutation(len(pool))]
    live = [t for t in names if per_task[t]]
    counts = np.array([len(per_task[t]) for t in live], dtype=np.float64)
    if not live:
        return []
    out: list[np.ndarray] = []
    cursor = {t: 0 for t in live}
    if mixing == "proportional":
        probs = counts / counts.sum()
        while True:
            t = live[int(rng.choice(len(live), p=probs))]
            if cursor[t] >= len(per_task[t]):
                return out
            out.append(per_task[t][cursor[t]])
            cursor[t] += 1
    total = int(counts.sum())
    for _ in range(total):  # balanced
        t = live[int(rng.integers(len(live)))]
        if cursor[t] >= len(per_task[t]):
            batches = per_task[t]
            per_task[t] = [batches[i] for i in rng.permutation(len(batches))]
            cursor[t] = 0
        out.append(per_task[t][cursor[t]])
        cursor[t] += 1
    return out


def micro_batches(step_batch: np.ndarray, world: int, accum: int, rank: int) -> list[np.ndarray]:
    """This process's ``accum`` micro-batches of a step batch (contiguous, similar-length slices).

    Slice ``a * world + rank`` goes to accumulation round ``a`` of process ``rank``.
    """
    parts = np.array_split(step_batch, world * accum)
    return [parts[a * world + rank] for a in range(accum)]


__all__ = ["Example", "ExampleSet", "FinetuneData", "MIXINGS", "Prepared", "default_tasks", "load_finetune_data",
           "micro_batches", "plan_epoch", "prepare_examples", "resolved_items"]
