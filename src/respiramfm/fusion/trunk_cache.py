"""Frozen-trunk cache: stage 2 trains only the adapted top layers; the layers below run once per record.

When LoRA adapts only the top ``k`` decoder layers (``lora.top_layers = k``), the
projector is frozen and every stage-2 input (prompt, context, audio token) is fixed
per record, the hidden states entering the first adapted layer are constants. They
are computed once, in batches, stored on disk and read back memory-mapped; every
epoch, seed and system whose inputs are fixed then runs only the top ``k`` layers
and the head. ``predict``/``serve`` keep running the whole model.

How the split is done without re-implementing any decoder: the model's own forward
pass runs with the decoder's layer list temporarily cut to the trunk (a hook keeps
the output of the last trunk layer) or to the top layers (a pre-hook hands the first
top layer the cached hidden states in place of whatever the embedding step
produced, so absolute position embeddings or embedding dropout are never applied
twice). Attention mask, rotary positions and pooling are the model's own.

Keys: the store folder is named by the identity of everything below the cut (base
weights, tokenizer, dtype, depth, the cut, the precision the trunk runs in, attention
implementation, library versions); a record's key hashes its token ids, segment layout and projected audio.
Anything that changes produces other keys, so stale entries are never read.

Prompts are shared as in training: the build runs each distinct prompt through the
trunk once and each record's own tokens after it (with the prompt's KV cache), and
the store (:mod:`respiramfm.fusion.trunk_store`, resumable) keeps the prompt's states
once; the top layers likewise run each prompt once per micro-batch.

It refuses, with a ConfigError, every setting in which cached states would differ
from the uncached forward pass: LoRA on every layer (nothing to cache), any
trainable parameter or LoRA module below the cut, a trainable projector, and
dropout below the cut while the model trains (unless ``accept_eval_trunk``, which
accepts that the trunk is evaluated in eval mode).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import transformers
from torch import nn
from transformers import DynamicCache

from respiramfm.errors import ConfigError, DataError
from respiramfm.fusion.infer import expand_kv, prompt_first
from respiramfm.models.sequence import collate, fill_audio
from respiramfm.fusion.trunk_store import FORMAT, TrunkStore

VERSION = 2
PRECISIONS = ("fp32", "bf16")  # the trunk's autocast: fp32 = none, bf16 = CPU/CUDA bfloat16 autocast
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


# ---------------------------------------------------------------------- the split
def decoder_layers(model) -> tuple[nn.Module, str, nn.ModuleList]:
    """(inner decoder, attribute name, layer list) of a fusion model."""
    inner = model.inner_decoder()
    attr = "layers" if hasattr(inner, "layers") else "h"
    layers = getattr(inner, attr, None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"cannot find the decoder layers of architecture {model.backbone.arch!r}")
    return inner, attr, layers


def lora_cut(model) -> int:
    """Index of the first LoRA-adapted layer, from the model's placement setting."""
    _, _, layers = decoder_layers(model)
    top = int(getattr(model.cfg.lora, "top_layers", 0) or 0)
    if not model.cfg.lora.enabled:
        raise ConfigError("trunk cache: LoRA is disabled; nothing marks where the trainable layers start")
    if top <= 0 or top >= len(layers):
        raise ConfigError(f"trunk cache: LoRA adapts every one of the {len(layers)} layers (lora.top_layers="
                          f"{top}); nothing below the first adapted layer to cache - set lora.top_layers to k < "
                          f"{len(layers)}")
    return len(layers) - top


def _trunk_dropout(model, cut: int) -> list[str]:
    """Names of everything below the cut that draws dropout in training mode."""
    inner, attr, layers = decoder_layers(model)
    top = {id(m) for layer in list(layers)[cut:] for m in layer.modules()}
    found = [name for name, m in inner.named_modules()
             if isinstance(m, nn.Dropout) and m.p > 0 and id(m) not in top]
    cfg = inner.config
    for key in ("attention_dropout", "attn_pdrop"):
        if float(getattr(cfg, key, 0.0) or 0.0) > 0:
            found.append(f"config.{key}={getattr(cfg, key)}")
    return found


def check_cacheable(model, cut: int, training: bool, accept_eval_trunk: bool = False) -> None:
    """Raise ConfigError when hidden states below ``cut`` are not constants of the inputs."""
    if any(p.requires_grad for p in model.projector.parameters()):
        raise ConfigError("trunk cache: the projector is trainable; its output (an input of the trunk) changes "
                          "every step")
    inner, attr, layers = decoder_layers(model)
    top = {id(p) for layer in list(layers)[cut:] for p in layer.parameters()}
    below = [n for n, p in inner.named_parameters() if p.requires_grad and id(p) not in top]
    lora_below = [n for n in model.lora_modules() if (m := _LAYER_RE.search(n)) and int(m.group(1)) < cut]
    if lora_below or below:
        raise ConfigError(f"trunk cache: LoRA or trainable weights below the cut at layer {cut}: "
                          f"{(lora_below or below)[:4]}")
    if training and not accept_eval_trunk:
        dropout = _trunk_dropout(model, cut)
        if dropout:
            raise ConfigError(f"trunk cache: dropout below layer {cut} is active in training mode ({dropout[:3]}); "
                              "cached states would be the eval-mode trunk - set accept_eval_trunk to accept that")


@contextlib.contextmanager
def _only_layers(model, start: int, stop: int):
    """The decoder runs layers[start:stop] only, for the duration of the block."""
    inner, attr, layers = decoder_layers(model)
    inner._modules[attr] = nn.ModuleList(list(layers)[start:stop])  # no re-registration of parameters
    try:
        yield list(layers)[start:stop]
    finally:
        inner._modules[attr] = layers


def _sub_config(model, start: int, stop: int):
    """The decoder config seen by a KV cache of layers[start:stop] (renumbered from 0)."""
    cfg = copy.copy(model.inner_decoder().config)
    cfg.num_hidden_layers = stop - start
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[start:stop]
    return cfg


@torch.no_grad()
def trunk_states(model, resolved: Sequence, cut: int, prefix: Sequence[int] | None = None,
                 prefix_cache=None) -> list[torch.Tensor]:
    """Hidden states entering layer ``cut``, one ``(L_i, H)`` tensor per resolved item (pads removed).

    With ``prefix`` and its trunk KV cache (:func:`trunk_prefix`), only each item's tokens
    after the shared prompt run, and only their states are returned.
    """
    side = "right" if prefix else model.cfg.padding_side
    batch = collate(list(resolved), model.backbone.pad_token_id, side, prefix=list(prefix) if prefix else None)
    batch = batch.to(model.device)
    embeds = fill_audio(model.input_embeddings()(batch.input_ids), batch.audio_mask, batch.audio)
    mask, kwargs = batch.attention_mask, {"use_cache": False}
    if prefix:
        mask = torch.cat([torch.ones(len(batch), len(prefix), dtype=mask.dtype, device=mask.device), mask], dim=1)
        kwargs = {"use_cache": True, "cache": expand_kv(model, prefix_cache, len(batch))}
    captured: list[torch.Tensor] = []
    with _only_layers(model, 0, cut) as trunk:
        handle = trunk[-1].register_forward_hook(
            lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            model.inner_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=batch.position_ids, **kwargs)
        finally:
            handle.remove()
    hidden, real = captured[0], batch.attention_mask.bool()
    return [hidden[b][real[b]].detach() for b in range(hidden.shape[0])]


@torch.no_grad()
def trunk_prefix(model, prefix: Sequence[int], cut: int):
    """(trunk KV cache, ``(P, H)`` states entering layer ``cut``) of a prompt on its own."""
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=model.device)
    cache = DynamicCache(config=_sub_config(model, 0, cut))
    captured: list[torch.Tensor] = []
    with _only_layers(model, 0, cut) as trunk:
        handle = trunk[-1].register_forward_hook(
            lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            model.inner_decoder()(inputs_embeds=model.input_embeddings()(ids), attention_mask=torch.ones_like(ids),
                                  position_ids=torch.arange(ids.shape[1], device=model.device)[None], cache=cache,
                                  use_cache=True)
        finally:
            handle.remove()
    return cache, captured[0][0].detach()


@contextlib.contextmanager
def _top_layers(model, cut: int):
    """Only layers[cut:] run, renumbered from 0 for the KV cache; the first is fed ``feed["hidden"]``."""
    feed: dict = {}
    with _only_layers(model, cut, None) as top:
        renamed = [(m, m.layer_idx) for i, layer in enumerate(top) for m in layer.modules()
                   if isinstance(getattr(m, "layer_idx", None), int)]
        for m, idx in renamed:
            m.layer_idx = idx - cut

        def hook(_module, args, kwargs):
            if args:
                return (feed["hidden"], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": feed["hidden"]}

        handle = top[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield feed
        finally:
            handle.remove()
            for m, idx in renamed:
                m.layer_idx = idx


def _padded(model, states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H) with each item's states at its mask-1 positions (zeros at pads)."""
    mask = mask.bool()
    for b, (s, n) in enumerate(zip(states, mask.sum(dim=1).tolist())):
        if s.shape[0] != n:
            raise DataError(f"cached trunk state {b} has {s.shape[0]} positions, the item has {n}")
    hidden = torch.zeros(*mask.shape, model.hidden_size, dtype=model.backbone.dtype, device=model.device)
    hidden[mask] = torch.cat([s.to(model.device, hidden.dtype) for s in states])
    return hidden


def top_logits(model, states: Sequence[torch.Tensor], resolved: Sequence, cut: int) -> torch.Tensor:
    """Logits (B, 2): the layers from ``cut`` up and the head, fed the given trunk states (with autograd).

    Every item padded in full: the reference the shared-prompt path is checked against.
    """
    batch = collate(list(resolved), model.backbone.pad_token_id, model.cfg.padding_side).to(model.device)
    hidden = _padded(model, states, batch.attention_mask)
    with _top_layers(model, cut) as feed:
        feed["hidden"] = hidden
        return model.forward_embeds(hidden, batch.attention_mask, batch.position_ids, batch.last_index)


def shared_top_logits(model, states: Sequence[torch.Tensor], resolved: Sequence, cut: int) -> torch.Tensor:
    """As :func:`top_logits`, but each distinct prompt runs through the top layers once per call.

    The top-layer counterpart of :func:`respiramfm.fusion.infer.shared_prefix_logits`: the
    prompt's states are the first item's (a causal trunk gives every item of a prompt the
    same ones), its top-layer keys/values are computed with autograd and expanded to the
    group, and only each item's own tokens run after them.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(resolved):
        kind, value = r.segments[0]
        groups.setdefault(tuple(value) if kind == "prompt" else (), []).append(i)
    out: list = [None] * len(resolved)
    for prefix, idx in groups.items():
        sub, n = [resolved[i] for i in idx], len(prefix)
        if not prefix or not prompt_first(model) or any(states[i].shape[0] <= n for i in idx):
            logits = top_logits(model, [states[i] for i in idx], sub, cut)
        else:
            batch = collate(sub, model.backbone.pad_token_id, "right", prefix=list(prefix)).to(model.device)
            with _top_layers(model, cut) as feed:
                feed["hidden"] = states[idx[0]][:n][None].to(model.device, model.backbone.dtype)
                cache = DynamicCache(config=_sub_config(model, cut, model.inner_decoder().config.num_hidden_layers))
                model.inner_decoder()(inputs_embeds=feed["hidden"], attention_mask=torch.ones(1, n, dtype=torch.long,
                                      device=model.device), position_ids=torch.arange(n, device=model.device)[None],
                                      cache=cache, use_cache=True)
                feed["hidden"] = _padded(model, [states[i][n:] for i in idx], batch.attention_mask)
                logits = model.forward_embeds(feed["hidden"], batch.attention_mask, batch.position_ids,
                                              batch.last_index, past_key_values=expand_kv(model, cache, len(idx)))
        for j, i in enumerate(idx):
            out[i] = logits[j]
    return torch.stack(out)


# ---------------------------------------------------------------------- keys
def item_key(item) -> str:
    """Content key of one resolved item: token ids, segment layout and projected audio."""
    h = hashlib.sha256()
    for kind, value in item.segments:
        h.update(kind.encode() + b"\0")
        if kind == "audio":
            a = value.detach().cpu().contiguous().to(torch.float32) if isinstance(value, torch.Tensor) else \
                torch.as_tensor(np.asarray(value, dtype=np.float32))
            h.update(str(tuple(a.shape)).encode() + a.numpy().tobytes())
        else:
            h.update(np.asarray(list(value), dtype=np.int64).tobytes())
    return h.hexdigest()


def trunk_identity(model, cut: int, precision: str = "fp32") -> dict:
    """Everything the trunk's output depends on besides the record itself (the autocast precision included)."""
    inner = model.inner_decoder()
    return {"format": FORMAT, "version": VERSION, "backbone": model.base_identity, "arch": model.backbone.arch,
            "cut": int(cut), "total_layers": len(decoder_layers(model)[2]), "precision": precision,
            "attn_implementation": str(getattr(inner.config, "_attn_implementation", "")),
            "padding_side": model.cfg.padding_side, "hidden_size": int(model.hidden_size),
            "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


class TrunkCache:
    """The frozen trunk of one fusion model, cached on disk under ``root``."""

    def __init__(self, model, root: str | os.PathLike, accept_eval_trunk: bool = False, precision: str = "fp32"):
        self.model = model
        self.cut = lora_cut(model)
        self.accept_eval_trunk = bool(accept_eval_trunk)
        if precision not in PRECISIONS:
            raise ConfigError(f"trunk cache: precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision  # the trunk always runs in it, whatever autocast the caller is in
        check_cacheable(model, self.cut, training=False)
        self.identity = trunk_identity(model, self.cut, precision)
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
        self.store = TrunkStore(Path(root) / digest, self.identity, model.hidden_size, model.backbone.dtype)
        self.computed = 0  # records whose trunk ran in this process (0 when everything was cached)

    def build(self, resolved: Sequence, batch_size: int = 16) -> int:
        """Compute and store the trunk states of every item not cached yet; returns how many ran."""
        keys = [item_key(r) for r in resolved]
        todo, seen = [], set()
        for i, k in enumerate(keys):
            if k not in self.store and k not in seen:
                todo.append(i)
                seen.add(k)
        groups: dict[tuple[int, ...], list[int]] = {}  # records of one prompt share its trunk pass
        for i in todo:
            kind, value = resolved[i].segments[0]
            n = sum(v.shape[0] if k == "audio" else len(v) for k, v in resolved[i].segments)
            shared = kind == "prompt" and prompt_first(self.model) and n > len(value)
            groups.setdefault(tuple(value) if shared else (), []).append(i)
        was_training = self.model.training
        self.model.eval()
        bf16 = self.precision == "bf16"
        try:
            with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=bf16):
                self._build_groups(groups, resolved, keys, batch_size)
        finally:
            self.model.train(was_training)
        self.computed += len(todo)
        return len(todo)

    def _build_groups(self, groups: dict, resolved: Sequence, keys: list[str], batch_size: int) -> None:
        for prefix, idx in groups.items():
            idx.sort(key=lambda i: -sum(v.shape[0] if k == "audio" else len(v) for k, v in resolved[i].segments))
            parent, cache = "", None
            if prefix:
                parent = "prompt:" + hashlib.sha256(np.asarray(prefix, dtype=np.int64).tobytes()).hexdigest()
                cache, states = trunk_prefix(self.model, prefix, self.cut)
                self.store.append({parent: states})
            for s in range(0, len(idx), max(1, batch_size)):
                chunk = idx[s:s + batch_size]
                states = trunk_states(self.model, [resolved[i] for i in chunk], self.cut, prefix or None, cache)
                self.store.append({keys[i]: st for i, st in zip(chunk, states)}, parent=parent)

    def logits(self, resolved: Sequence, shared_prompt: bool = True) -> torch.Tensor:
        """Logits (B, 2) from cached trunk states (built on demand); autograd flows through the top only.

        ``shared_prompt`` runs each distinct prompt once through the top layers (as training's
        :func:`~respiramfm.fusion.infer.shared_prefix_logits` does); False pads every item in full.
        """
        check_cacheable(self.model, self.cut, self.model.training, self.accept_eval_trunk)
        keys = [item_key(r) for r in resolved]
        if any(k not in self.store for k in keys):
            self.build(resolved)
        states = [self.store.get(k) for k in keys]
        fn = shared_top_logits if shared_prompt else top_logits
        return fn(self.model, states, resolved, self.cut)

    @torch.inference_mode()
    def predict_logits(self, resolved: Sequence, batch_size: int = 32) -> torch.Tensor:
        """Logits (N, 2) in eval mode (validation), batched within prompt groups; the mode is restored."""
        was_training = self.model.training
        self.model.eval()
        try:
            self.build(resolved, batch_size)
            order = sorted(range(len(resolved)), key=lambda i: (str(resolved[i].segments[0][1]), i))
            out = torch.empty(len(resolved), 2, dtype=torch.float32)
            for s in range(0, len(order), max(1, batch_size)):
                chunk = order[s:s + batch_size]
                out[torch.tensor(chunk)] = self.logits([resolved[i] for i in chunk]).float().cpu()
            return out
        finally:
            self.model.train(was_training)


__all__ = ["TrunkCache", "TrunkStore", "check_cacheable", "item_key", "lora_cut", "shared_top_logits", "top_logits",
           "trunk_identity", "trunk_prefix", "trunk_states"]
