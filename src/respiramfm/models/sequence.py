"""Building the stage-2 input sequence: per-sample segments -> one padded batch.

A sample is up to three segments — the task prompt, the patient context and
the audio token(s) — laid out in a configurable order (official: prompt,
context, audio). The LLM reads them as ``inputs_embeds``; this module decides
*where* everything goes and leaves the embedding lookup to the model.

Three things the official code got wrong are fixed here by construction
(docs/paper.md §4, §8):

* the attention mask is built segment by segment in the **same order** as the
  embeddings (defect 1), so the audio token is always visible;
* pads are only ever marked by the mask, and position ids come from the mask
  (``cumsum - 1``), so left and right padding give identical results and a pad
  embedding can never leak into a real token;
* the pooling index is the last position whose mask is 1, computed per row —
  never position −1, which is a pad for every row but the longest.

A shared prompt prefix can be handed to the model as a KV cache: ``prefix_len``
tokens are then left out of the batch and every position is shifted by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch

from respiramfm.errors import DataError
SEGMENT_CODE = {"pad": 0, "prompt": 1, "context": 2, "audio": 3}
AUDIO_TOKEN = -1  # placeholder id inside a flattened sample, replaced by the pad id in ``input_ids``


@dataclass
class FusionItem:
    """One sample as the caller knows it (see the model's ``resolve`` for the rules).

    ``audio`` is the *encoder* embedding — ``(in_dim,)`` or ``(n_audio_tokens, in_dim)`` —
    because the frozen projector belongs to the model. ``context`` and ``prompt`` may
    be text or token ids already produced by the model's tokenizer helpers.
    """

    task: Any = None                      # task name or Task; builds the prompt
    audio: Any = None                     # np.ndarray / torch.Tensor or None
    context: str | Sequence[int] | None = None
    audio_type: str = ""                  # "" -> the task's own audio type
    prompt: str | Sequence[int] | None = None
    label: int | None = None
    key: str = ""                         # caller's identifier, echoed in error messages


@dataclass
class ResolvedItem:
    """A sample after the mode / missing-modality rules: ordered segments, ready to collate."""

    segments: list[tuple[str, Any]]       # ("prompt"|"context", ids) or ("audio", (n_tokens, in_dim) tensor)
    modalities: tuple[str, ...]           # subset of ("audio", "context") actually used
    label: int | None = None

    def flat(self) -> tuple[list[int], list[int]]:
        """(token ids with AUDIO_TOKEN placeholders, segment codes), in sequence order."""
        ids: list[int] = []
        codes: list[int] = []
        for kind, value in self.segments:
            n = value.shape[0] if kind == "audio" else len(value)
            ids += [AUDIO_TOKEN] * n if kind == "audio" else list(value)
            codes += [SEGMENT_CODE[kind]] * n
        return ids, codes

    def audio(self) -> torch.Tensor | None:
        for kind, value in self.segments:
            if kind == "audio":
                return value
        return None


@dataclass
class FusionBatch:
    """Padded tensors for one forward pass; every (B, L) tensor is in embedding order."""

    input_ids: torch.Tensor               # (B, L) long; pad id at pad and audio positions
    attention_mask: torch.Tensor          # (B, L) long; 1 real (incl. audio), 0 pad
    position_ids: torch.Tensor            # (B, L) long; prefix_len + cumsum(mask) - 1, pads at 0
    segment_ids: torch.Tensor             # (B, L) long; see SEGMENT_CODE
    audio_mask: torch.Tensor              # (B, L) bool; True where projected audio goes
    audio: torch.Tensor | None            # (A, n_audio_tokens, in_dim) float32, A = samples with audio
    last_index: torch.Tensor              # (B,) long; pooling position = last real token
    modalities: list[tuple[str, ...]] = field(default_factory=list)
    labels: torch.Tensor | None = None    # (B,) long when every sample has a label
    prefix_len: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: str | torch.device) -> "FusionBatch":
        def mv(t):
            return None if t is None else t.to(device)

        return replace(self, input_ids=mv(self.input_ids), attention_mask=mv(self.attention_mask),
                       position_ids=mv(self.position_ids), segment_ids=mv(self.segment_ids),
                       audio_mask=mv(self.audio_mask), audio=mv(self.audio), last_index=mv(self.last_index),
                       labels=mv(self.labels))


def as_audio_tensor(audio: Any, n_tokens: int, in_dim: int, key: str = "") -> torch.Tensor:
    """Check and reshape one encoder embedding to ``(n_tokens, in_dim)`` float32."""
    where = f"item {key}: " if key else ""
    t = torch.as_tensor(np.asarray(audio) if not isinstance(audio, torch.Tensor) else audio)
    t = t.detach().to(torch.float32)
    if t.ndim == 1 and n_tokens == 1:
        t = t.unsqueeze(0)
    if tuple(t.shape) != (n_tokens, in_dim):
        want = f"({in_dim},) or (1, {in_dim})" if n_tokens == 1 else f"({n_tokens}, {in_dim})"
        raise DataError(f"{where}audio embedding has shape {tuple(t.shape)}, expected {want}")
    if not torch.isfinite(t).all():
        raise DataError(f"{where}audio embedding contains NaN or inf")
    return t.cpu()


def _strip_prefix(ids: list[int], codes: list[int], prefix: Sequence[int], index: int) -> tuple[list[int], list[int]]:
    p = len(prefix)
    if ids[:p] != list(prefix):
        raise DataError(f"sample {index} does not start with the cached prefix ({p} tokens); "
                        "group items by prompt before using a prefix cache")
    if len(ids) == p:
        raise DataError(f"sample {index} has nothing after the cached prefix")
    return ids[p:], codes[p:]


def collate(resolved: Sequence[ResolvedItem], pad_id: int, padding_side: str = "right",
            prefix: Sequence[int] | None = None) -> FusionBatch:
    """Pad resolved samples into a :class:`FusionBatch`.

    With ``prefix`` (token ids held in a KV cache), those leading tokens are
    removed from every sample, positions start at ``len(prefix)``, and padding is
    forced to the right so each row's suffix directly follows the cached prefix.
    """
    if not resolved:
        raise DataError("cannot collate an empty list of items")
    if padding_side not in ("left", "right"):
        raise DataError(f"padding side must be 'left' or 'right', not {padding_side!r}")
    prefix_len = len(prefix) if prefix else 0
    if prefix_len:
        padding_side = "right"
    rows = []
    for i, r in enumerate(resolved):
        ids, codes = r.flat()
        if prefix_len:
            ids, codes = _strip_prefix(ids, codes, prefix, i)
        rows.append((ids, codes))
    B, L = len(rows), max(len(ids) for ids, _ in rows)
    input_ids = torch.full((B, L), int(pad_id), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    segs = torch.zeros((B, L), dtype=torch.long)
    for b, (ids, codes) in enumerate(rows):
        n = len(ids)
        sl = slice(L - n, L) if padding_side == "left" else slice(0, n)
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[b, sl] = torch.where(t == AUDIO_TOKEN, torch.full_like(t, int(pad_id)), t)
        mask[b, sl] = 1
        segs[b, sl] = torch.tensor(codes, dtype=torch.long)
    audio_mask = segs == SEGMENT_CODE["audio"]
    audios = [a for a in (r.audio() for r in resolved) if a is not None]
    audio = torch.stack(audios) if audios else None
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0) + prefix_len
    positions = positions.masked_fill(mask == 0, 0)
    labels = None
    if all(r.label is not None for r in resolved):
        labels = torch.tensor([int(r.label) for r in resolved], dtype=torch.long)
    return FusionBatch(input_ids=input_ids, attention_mask=mask, position_ids=positions, segment_ids=segs,
                       audio_mask=audio_mask, audio=audio, last_index=last_real_index(mask),
                       modalities=[r.modalities for r in resolved], labels=labels, prefix_len=prefix_len)


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the largest index whose mask is 1 (rows must have at least one real token)."""
    L = mask.shape[1]
    if bool((mask.sum(dim=1) == 0).any()):
        raise DataError("a sample has no real tokens")
    flipped_first = torch.argmax(mask.flip(dims=[1]).to(torch.int64), dim=1)
    return (L - 1 - flipped_first).to(torch.long)


def fill_audio(embeds: torch.Tensor, audio_mask: torch.Tensor, projected: torch.Tensor | None) -> torch.Tensor:
    """Place projected audio ``(A, n_tokens, H)`` at the audio positions of ``embeds`` (B, L, H).

    Boolean indexing walks rows in order and positions left to right, which is
    exactly sample order and token order, so a flat reshape lines up.
    """
    n = int(audio_mask.sum())
    if projected is None:
        if n:
            raise DataError("batch has audio positions but no audio embeddings")
        return embeds
    flat = projected.reshape(-1, projected.shape[-1]).to(embeds.dtype)
    if flat.shape[0] != n:
        raise DataError(f"batch has {n} audio positions but {flat.shape[0]} audio vectors")
    out = embeds.clone()
    out[audio_mask] = flat
    return out
