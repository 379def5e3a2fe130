"""The stage-2 RespiraMFM classifier: frozen projector + LLM with LoRA + a linear head.

What trains and what does not (the question LLaVA users ask most, docs/paper.md §8):
the audio encoder is outside this module (it hands us embeddings), the stage-1
projector is **frozen** and kept in eval mode even inside ``model.train()``
(defect 6), the LLM's base weights are frozen, and only the LoRA matrices on the
inner decoder and the ``hidden -> 2`` head learn. Unlike LLaVA, our projector
stays frozen in stage 2, as the paper states.

The model reads ``inputs_embeds`` built by :mod:`respiramfm.models.sequence`,
runs the decoder body only (no LM head), pools the last real token and applies
the head; ``softmax(logits)[:, 1]`` is the probability that the condition is
present (label 1).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from respiramfm.data.tasks import all_tasks, get_task
from respiramfm.data.templates import task_prompt
from respiramfm.errors import CheckpointError, ConfigError, DataError
from respiramfm.llm.backbones import load_backbone, tiny_backbone
from respiramfm.models import saved
from respiramfm.models.base import SavedModel, load_safetensors
from respiramfm.models.configuration import FusionConfig
from respiramfm.models.lora import apply_lora, injected_modules, load_adapter_strict
from respiramfm.models.projector import load_projector
from respiramfm.models.sequence import (SEGMENT_CODE, FusionBatch, FusionItem, ResolvedItem,
                                        as_audio_tensor, collate, fill_audio)

def load_configured_backbone(cfg: FusionConfig, device: str | torch.device = "cpu", local_only: bool = False):
    """The backbone ``cfg`` names: a ``tiny-<arch>`` test model or anything :func:`load_backbone` reads.

    ``local_only``: a hub id is looked up in the local Hugging Face cache only (no network).
    """
    if cfg.backbone.startswith("tiny-"):
        kw = dict(cfg.tiny)
        kw.setdefault("attn_implementation", cfg.attn_implementation)
        bb = tiny_backbone(cfg.backbone[len("tiny-"):], dtype=cfg.dtype, device=device,
                           padding_side=cfg.padding_side, **kw)
    else:
        bb = load_backbone(cfg.backbone, dtype=cfg.dtype, revision=cfg.revision, device=device,
                           padding_side=cfg.padding_side, attn_implementation=cfg.attn_implementation,
                           local_only=local_only)
    return bb.keep_first_layers(cfg.num_layers) if cfg.num_layers else bb


class RespiraMFM(SavedModel):
    """Stage-2 fusion classifier. See :mod:`respiramfm.models.sequence` for the input rules."""

    FORMAT = saved.FORMAT
    FORMAT_VERSION = saved.FORMAT_VERSION
    CONFIG_NAME = saved.CONFIG_NAME

    def __init__(self, cfg: FusionConfig, projector: nn.Module, backbone=None,
                 projector_provenance: dict | None = None, tasks: dict | None = None):
        super().__init__()
        self.cfg = cfg.validate()
        self.backbone = backbone if backbone is not None else load_configured_backbone(cfg)
        self.tokenizer = self.backbone.tokenizer
        self.hidden_size = int(self.backbone.hidden_size)
        out_dim = getattr(getattr(projector, "cfg", None), "out_dim", None)
        if out_dim != self.hidden_size:
            raise ConfigError(f"projector outputs {out_dim}-d vectors but the LLM's hidden size is {self.hidden_size}")
        self.in_dim = int(projector.cfg.in_dim)
        self.projector = projector.to(self.backbone.device)
        self.projector.requires_grad_(False)
        self.projector.eval()
        self.projector_provenance = dict(projector_provenance or {})
        # Identity of the *base* weights, taken before LoRA layers join the state dict.
        self.base_identity = self.backbone.identity()
        self.saved_config: dict | None = None  # config.json when loaded from a directory
        self.thresholds: dict = {}  # task -> decision threshold chosen on validation (models/saved.py)
        self.trained_on: dict = {}  # what stage 2 trained and validated on (datasets, tasks, simulated)
        decoder = self.backbone.decoder()
        if any(".lora_" in name for name, _ in decoder.named_parameters()):
            raise ConfigError("this backbone already carries LoRA adapters (used by another model); load a fresh one")
        decoder.requires_grad_(False)
        self.llm = apply_lora(decoder, cfg.lora, self.backbone.arch) if cfg.lora.enabled else decoder
        self.head = nn.Linear(self.hidden_size, 2, bias=cfg.head_bias).to(self.backbone.device)
        self._embed_norm = self._mean_embedding_norm() if cfg.audio_scale == "embedding_rms" else None
        self._prompt_cache: dict[str, tuple[int, ...]] = {}
        if tasks is None:
            tasks = all_tasks()
        self.tasks = dict(tasks)
        self.eval()

    # ------------------------------------------------------------------ modes and parts
    def train(self, mode: bool = True) -> "RespiraMFM":
        super().train(mode)
        self.projector.eval()  # frozen aligner: its dropout must never switch on (defect 6)
        return self

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def input_embeddings(self) -> nn.Module:
        return self.backbone.model.get_input_embeddings()

    def inner_decoder(self) -> nn.Module:
        """The transformer body (``LlamaModel``...), unwrapped from PEFT."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def lora_modules(self) -> list[str]:
        return injected_modules(self.llm) if self.cfg.lora.enabled else []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA matrices and the head — everything an optimiser should receive."""
        return [p for p in self.parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        """Recompute decoder activations in backward (non-reentrant, so frozen inputs still pass gradients)."""
        inner = self.inner_decoder()
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x name
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _mean_embedding_norm(self) -> float:
        with torch.no_grad():
            w = self.input_embeddings().weight.float()
            return float(w.norm(dim=1).mean())

    # ------------------------------------------------------------------ text
    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize_context(self, text: str) -> list[int]:
        """Context ids, truncated (never padded) to ``max_context_tokens``."""
        return self.tokenize(text)[: self.cfg.max_context_tokens]

    def get_task(self, task):
        """A Task from a name (the model's own task snapshot first, then the registry) or a Task."""
        if not isinstance(task, str):
            return task
        if task in self.tasks:
            return self.tasks[task]
        try:
            return get_task(task)
        except ConfigError:
            raise ConfigError(f"unknown task {task!r}; this model knows {sorted(self.tasks)}") from None

    def prompt_text(self, task, audio_type: str = "", with_audio: bool = True) -> str:
        return task_prompt(self.get_task(task), audio_type, with_audio=with_audio, style=self.cfg.prompt_style)

    def prompt_ids(self, task, audio_type: str = "", with_audio: bool = True) -> list[int]:
        """Token ids of the task prompt (memoised: a handful of prompts serve every sample)."""
        text = self.prompt_text(task, audio_type, with_audio)
        if text not in self._prompt_cache:
            self._prompt_cache[text] = tuple(self.tokenize(text))
        return list(self._prompt_cache[text])

    # ------------------------------------------------------------------ sequences
    def resolve(self, item: FusionItem) -> ResolvedItem:
        """Apply the mode and missing-modality rules to one item.

        Audio is used unless the mode is text-only or the item has none; the
        context is used unless the mode is audio-only or it is empty. The prompt
        drops its audio clause whenever no audio is used (defect 8). An item
        left with neither modality is a :class:`DataError`.
        """
        key = item.key or ""
        use_audio = item.audio is not None and self.cfg.mode != "text_only"
        ctx = item.context
        if isinstance(ctx, str):
            ctx = self.tokenize_context(ctx) if ctx.strip() else []
        ctx = list(ctx or [])[: self.cfg.max_context_tokens]
        use_ctx = bool(ctx) and self.cfg.mode != "audio_only"
        if not use_audio and not use_ctx:
            what = {"audio_only": "no audio (mode audio_only)", "text_only": "no context (mode text_only)"}
            raise DataError(f"item {key}: nothing to classify: {what.get(self.cfg.mode, 'no audio and no context')}")
        if item.prompt is not None:
            prompt = self.tokenize(item.prompt) if isinstance(item.prompt, str) else list(item.prompt)
        elif item.task is not None:
            prompt = self.prompt_ids(item.task, item.audio_type, with_audio=use_audio)
        else:
            raise DataError(f"item {key}: needs a task (or an explicit prompt)")
        parts: dict[str, Any] = {"prompt": prompt}
        if use_ctx:
            parts["context"] = ctx
        if use_audio:
            parts["audio"] = as_audio_tensor(item.audio, self.cfg.n_audio_tokens, self.in_dim, key)
        segments = [(k, parts[k]) for k in self.cfg.order if k in parts and (k == "audio" or len(parts[k]))]
        modalities = tuple(m for m in ("audio", "context") if m in parts)
        return ResolvedItem(segments=segments, modalities=modalities, label=item.label)

    def collate(self, items: Sequence[FusionItem], prefix: Sequence[int] | None = None) -> FusionBatch:
        resolved = [self.resolve(it) for it in items]
        return collate(resolved, self.backbone.pad_token_id, self.cfg.padding_side, prefix=prefix)

    # ------------------------------------------------------------------ forward
    def project_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(A, n_tokens, in_dim) encoder embeddings -> (A, n_tokens, H) input vectors (frozen projector)."""
        with torch.no_grad():
            out = self.projector(audio.to(self.device, torch.float32))
        if self._embed_norm is not None:  # put audio on the token-embedding scale (defect-10 study knob)
            out = out * (self._embed_norm / out.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return out

    def embed(self, batch: FusionBatch) -> torch.Tensor:
        """``inputs_embeds`` (B, L, H): token embeddings with the projected audio spliced in."""
        embeds = self.input_embeddings()(batch.input_ids.to(self.device))
        projected = self.project_audio(batch.audio) if batch.audio is not None else None
        return fill_audio(embeds, batch.audio_mask.to(self.device), projected)

    def forward_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                       last_index: torch.Tensor, past_key_values=None, output_attentions: bool = False,
                       audio_mask: torch.Tensor | None = None):
        """Logits (B, 2) from ready embeddings; ``attention_mask`` may omit the cached prefix columns.

        ``audio_mask`` (B, L) marks the audio columns; this head pools the last real token and ignores
        it (a head that reads the audio positions, RespLLM's FlattenHead, needs it)."""
        hidden, _ = self._run(inputs_embeds, attention_mask, position_ids, past_key_values, output_attentions)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index.to(hidden.device)]
        return self.head(pooled.to(self.head.weight.dtype))

    def _run(self, inputs_embeds, attention_mask, position_ids, past_key_values=None, output_attentions=False):
        mask = attention_mask.to(self.device)
        if past_key_values is not None:
            p = past_key_values.get_seq_length()
            mask = torch.cat([torch.ones(mask.shape[0], p, dtype=mask.dtype, device=mask.device), mask], dim=1)
        kwargs = {"cache": past_key_values} if past_key_values is not None else {}
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids.to(self.device),
                       use_cache=past_key_values is not None, output_attentions=output_attentions, **kwargs)
        return out.last_hidden_state, (out.attentions if output_attentions else None)

    def forward(self, batch: FusionBatch, past_key_values=None) -> torch.Tensor:
        if past_key_values is not None and past_key_values.get_seq_length() != batch.prefix_len:
            raise DataError(f"cache holds {past_key_values.get_seq_length()} tokens, batch expects {batch.prefix_len}")
        return self.forward_embeds(self.embed(batch), batch.attention_mask, batch.position_ids, batch.last_index,
                                   past_key_values=past_key_values, audio_mask=batch.audio_mask)

    @torch.no_grad()
    def predict_proba(self, items: Sequence[FusionItem], batch_size: int = 16) -> np.ndarray:
        """P(condition present) per item, in eval mode (the previous mode is restored)."""
        was_training = self.training
        self.eval()
        try:
            out = []
            for start in range(0, len(items), batch_size):
                logits = self(self.collate(items[start:start + batch_size]))
                out.append(torch.softmax(logits.float(), dim=-1)[:, 1].cpu().double().numpy())
            return np.concatenate(out) if out else np.zeros(0)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ shared-prefix KV cache
    @torch.no_grad()
    def prefix_cache(self, prefix_ids: Sequence[int]):
        """KV cache (batch 1) of a shared prompt prefix, for inference with ``collate(..., prefix=ids)``."""
        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=self.device)
        if ids.shape[1] == 0:
            raise DataError("empty prefix")
        embeds = self.input_embeddings()(ids)
        out = self.llm(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                       position_ids=torch.arange(ids.shape[1], device=self.device)[None], use_cache=True)
        return out.cache

    @staticmethod
    def expand_cache(cache, batch_size: int):
        """A fresh copy of a batch-1 cache repeated to ``batch_size`` rows (forward passes extend caches)."""
        new = copy.deepcopy(cache)
        new.batch_repeat_interleave(int(batch_size))
        return new

    # ------------------------------------------------------------------ attribution
    @torch.no_grad()
    def attention_attribution(self, item: FusionItem, layers: int = 1) -> dict:
        """Attention of the pooled token over the context tokens (heads averaged, last ``layers`` layers).

        ``weights[i]`` is the attention mass the pooled (last real) token puts on
        context token ``i``; they sum to ``context_mass``, the share of its
        attention that goes to the context at all. Needs eager attention, which
        is switched on for this call only.
        """
        was_training = self.training
        self.eval()
        batch = self.collate([item])
        if "context" not in batch.modalities[0]:
            return {"tokens": [], "weights": [], "context_mass": 0.0, "layers": layers}
        inner = self.inner_decoder()
        previous = inner.config._attn_implementation
        inner.set_attn_implementation("eager")
        try:
            _, attentions = self._run(self.embed(batch), batch.attention_mask, batch.position_ids,
                                      output_attentions=True)
        finally:
            inner.set_attn_implementation(previous)
            self.train(was_training)
        n = max(1, min(int(layers), len(attentions)))
        last = int(batch.last_index[0])
        att = torch.stack([a[0, :, last, :].float() for a in attentions[-n:]]).mean(dim=(0, 1))  # (L,)
        ctx = (batch.segment_ids[0] == SEGMENT_CODE["context"]).nonzero().flatten().to(att.device)
        ids = batch.input_ids[0, ctx].tolist()
        weights = att[ctx].cpu().double()
        return {"tokens": [self.tokenizer.decode([i]) for i in ids], "weights": weights.tolist(),
                "context_mass": float(weights.sum()), "layers": n}

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the model directory (layout: :mod:`respiramfm.models.saved`) atomically."""
        return saved.save_pretrained(self, directory, extra=extra)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        allow_download: bool = False) -> "RespiraMFM":
        """Rebuild a saved model strictly; CheckpointError lists every problem.

        Every file is checked before use; the base LLM comes from local files only unless
        ``allow_download`` (a saved directory must never make the program reach the network).
        """
        d = Path(directory)
        info = saved.read_config(d)
        cfg, tasks = saved.parse_config(d, info)
        projector, _ = load_projector(d)  # strict on its own (missing/unexpected/shape/non-finite)
        backbone = load_configured_backbone(cfg, device=device, local_only=not allow_download)
        saved.check_backbone(info, backbone, d)
        model = cls(cfg, projector, backbone, projector_provenance=info["projector"].get("provenance"), tasks=tasks)
        problems = saved.check_model_files(d, info, model)
        if problems:
            raise CheckpointError("model directory does not match its config:\n  - " + "\n  - ".join(problems),
                                  path=d)
        if cfg.lora.enabled:
            load_adapter_strict(d / saved.ADAPTER_DIR, model.llm)
        model.head.load_state_dict(load_safetensors(d / saved.HEAD_NAME), strict=True)
        model.saved_config = info
        model.thresholds, model.trained_on = dict(info.get("thresholds", {})), dict(info.get("trained_on", {}))
        return model.to(device).eval()
