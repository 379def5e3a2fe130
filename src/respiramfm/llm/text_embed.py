"""Stage-1 text targets f_T: one vector per context string from a frozen LLM.

The official code tokenises each context alone, truncates it to 125 tokens and
takes the mean of Phi-2's ``last_hidden_state`` over its tokens (docs/paper.md §4).
We compute the same thing in padded batches: padding is masked out of
attention, position ids are counted over real tokens only (so left padding and
absolute-position models give the same states), and pooling is a mask-weighted
mean, so a batched result equals the one-at-a-time result to float rounding.

Three target spaces can be compared (docs/paper.md §4, docs/defects.md #10):

* ``hidden_mean`` — mean last hidden state over real tokens (the paper's target);
* ``input_mean``  — mean of the input-embedding vectors (the space stage 2 feeds
  the projector output into);
* ``last_token``  — last hidden state of the last real token.

The ``respiramfm embed-text`` command and its on-disk store live in
:mod:`respiramfm.llm.text_store`, which calls this module.
"""

from __future__ import annotations

import torch

from respiramfm.errors import ConfigError, DataError

SPACES = ("hidden_mean", "input_mean", "last_token")
DEFAULT_MAX_TOKENS = 125


def tokenize(backbone, texts: list[str], max_tokens: int = DEFAULT_MAX_TOKENS) -> list[list[int]]:
    """Token ids of each text alone (tokenizer's own special tokens), truncated to ``max_tokens``."""
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    enc = backbone.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_tokens)
    return [list(ids) for ids in enc["input_ids"]]


def pad_batch(seqs: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token lists to a rectangle; return ``(input_ids, attention_mask, position_ids)``.

    Position ids count real tokens only (0 at each sequence's first real token),
    so a left-padded sequence sees the same positions as when it is alone.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def pool(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Mask-aware pooling in float32: ``"mean"`` over real tokens or ``"last"`` real token.

    Padded positions are selected away with ``where`` rather than multiplied by
    zero, so a non-finite value in a padded slot cannot leak into the result.
    """
    states = states.float()
    keep = mask.bool().unsqueeze(-1)
    if how == "mean":
        total = torch.where(keep, states, torch.zeros((), dtype=states.dtype)).sum(dim=1)
        return total / mask.sum(dim=1, keepdim=True).to(states.dtype)
    if how == "last":
        idx = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
        return states[torch.arange(states.shape[0], device=states.device), idx]
    raise ValueError(how)


@torch.no_grad()
def embed_token_batch(backbone, seqs: list[list[int]], space: str) -> torch.Tensor:
    """Targets for one batch of token lists (all non-empty), as float32 on CPU."""
    device = backbone.device
    ids, mask, positions = pad_batch(seqs, backbone.pad_token_id, backbone.padding_side)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    if space == "input_mean":
        states = backbone.model.get_input_embeddings()(ids)
        return pool(states, mask, "mean").cpu()
    out = backbone.decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    how = "mean" if space == "hidden_mean" else "last"
    return pool(out.last_hidden_state, mask, how).cpu()


def text_targets(backbone, texts: list[str], space: str = "hidden_mean", max_tokens: int = DEFAULT_MAX_TOKENS,
                 batch_size: int = 16) -> torch.Tensor:
    """Text targets ``(N, hidden)`` float32 for ``texts``, in input order.

    The LLM runs in eval mode without gradients. Texts are batched by length
    (longest first) to limit padding; the result does not depend on the
    batching beyond float rounding. A text that yields no tokens raises
    :class:`DataError` naming its index.
    """
    if space not in SPACES:
        raise ConfigError(f"unknown text-target space {space!r} (expected one of {SPACES})")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    if not texts:
        return torch.zeros((0, backbone.hidden_size), dtype=torch.float32)
    seqs = tokenize(backbone, texts, max_tokens)
    empty = [i for i, s in enumerate(seqs) if not s]
    if empty:
        raise DataError(f"text(s) at index {empty[:10]} produce no tokens; nothing to embed")
    was_training = backbone.model.training
    backbone.model.eval()
    try:
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
        out = torch.empty((len(seqs), backbone.hidden_size), dtype=torch.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = embed_token_batch(backbone, [seqs[i] for i in idx], space)
    finally:
        backbone.model.train(was_training)
    return out
