"""LLM baselines whose audio projector trains END TO END with the LoRA: RespLLM and "no alignment".

Both reuse the RespiraMFM stage-2 machinery (:class:`respiramfm.models.fusion.RespiraMFM`:
sequence layout, correct attention mask, last-real-token pooling, shared-prompt KV
prefix) and differ from it in one respect: **the projector is a trainable parameter**
instead of a frozen stage-1 aligner. :class:`EndToEndModel` lifts the freeze, and
:func:`train_end_to_end` projects each batch's audio *with autograd* (the RespiraMFM
trainer projects once and caches, which is only valid for a frozen projector).

* **RespLLM** (:func:`build_respllm`; docs/paper.md §5, ``evelyn0414/RespLLM``): one
  ``Linear(in_dim, d_llm)`` projector, no stage 1, RespLLM prompt wording, 1 pooled
  audio token or the 64-token OPERA-CT grid (``respiramfm embed --tokens``), and either
  RespLLM's ``FlattenHead`` (first ``d_ff`` = 32 channels of the last hidden state at the
  last ``n_audio_tokens`` positions, flattened channel-major ``c * P + p``, then
  ``Linear(32 * P, 2)``, dropout 0) or our last-token linear head. Differences from the
  released code, all deliberate:

  - we pass a correct attention mask (RespLLM passed none, so its eos pads were attended);
    with the mask the "last ``P`` positions" are the last ``P`` *real* positions of each row;
  - OPERA-CT runs with its real weights in eval mode (the release never loaded them);
  - model selection uses the RespiraMFM rule (mean validation AUROC, or validation loss
    with ``select_metric="loss"``; RespLLM used early stopping on summed validation loss,
    patience 2) — never test;
  - task mixing defaults to ``proportional`` (RespLLM's sampler: a task per step with
    probability proportional to its batch count, epoch ends when the first task runs out);
  - the LLM is whatever backbone the comparison uses (the release used Llama-class 7-8B models).

* **No alignment** (:func:`build_no_alignment`): RespiraMFM's MLP projector, randomly
  initialised and trained end to end with the LoRA — stage 2 without stage 1 — with
  RespiraMFM's prompt, pooling and head. The paper's alignment ablation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from respiramfm.errors import ConfigError, DataError
from respiramfm.fusion.data import plan_epoch, prepare_examples, resolved_items
from respiramfm.fusion.infer import predict_proba, shared_prefix_logits, validation_metrics
from respiramfm.fusion.train_config import SELECT_KEYS
from respiramfm.models.configuration import FusionConfig, ProjectorConfig
from respiramfm.models.fusion import RespiraMFM, load_configured_backbone
from respiramfm.models.projector import Projector
from respiramfm.training.config import Budget, OptimConfig, RunSettings
from respiramfm.training.engine import TrainTask, Trainer, make_accelerator

HEADS = ("last", "flatten")


class EndToEndModel(RespiraMFM):
    """RespiraMFM whose projector trains (and follows ``train()``/``eval()``), with an optional FlattenHead."""

    def __init__(self, cfg: FusionConfig, projector: nn.Module, backbone=None, head: str = "last", d_ff: int = 32,
                 tasks: dict | None = None, provenance: dict | None = None):
        if head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got {head!r}")
        super().__init__(cfg, projector, backbone=backbone, projector_provenance=provenance, tasks=tasks)
        self.projector.requires_grad_(True)  # trained end to end: the point of these baselines
        self.head_kind = head
        self.d_ff = int(d_ff)
        if head == "flatten":
            if not 1 <= self.d_ff <= self.hidden_size:
                raise ConfigError(f"d_ff must lie in [1, hidden size {self.hidden_size}], got {d_ff}")
            self.head = nn.Linear(self.d_ff * cfg.n_audio_tokens, 2).to(self.backbone.device)

    def train(self, mode: bool = True) -> "EndToEndModel":
        nn.Module.train(self, mode)  # unlike RespiraMFM, the projector's dropout follows the model
        return self

    def project_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """Differentiable projection (grad flows into the projector when autograd is on)."""
        out = self.projector(audio.to(self.device, torch.float32))
        if self._embed_norm is not None:
            out = out * (self._embed_norm / out.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return out

    def flatten_features(self, hidden: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
        """(B, L, H) states -> (B, d_ff * P): channels ``:d_ff`` at the last ``P`` real positions, channel-major."""
        p = self.cfg.n_audio_tokens
        pos = last_index.to(hidden.device)[:, None] - torch.arange(p - 1, -1, -1, device=hidden.device)[None]
        if bool((pos < 0).any()):
            raise DataError(f"a sequence is shorter than the {p} positions FlattenHead reads")
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        states = hidden[rows, pos][..., : self.d_ff]          # (B, P, d_ff)
        return states.transpose(1, 2).reshape(hidden.shape[0], self.d_ff * p)  # index c * P + p

    def forward_embeds(self, inputs_embeds, attention_mask, position_ids, last_index, past_key_values=None,
                       output_attentions: bool = False):
        if self.head_kind == "last":
            return super().forward_embeds(inputs_embeds, attention_mask, position_ids, last_index,
                                          past_key_values, output_attentions)
        hidden, _ = self._run(inputs_embeds, attention_mask, position_ids, past_key_values, output_attentions)
        return self.head(self.flatten_features(hidden, last_index).to(self.head.weight.dtype))

    def save_pretrained(self, directory, extra: dict | None = None):
        if self.head_kind == "flatten":
            raise ConfigError("the FlattenHead RespLLM baseline is not a RespiraMFM directory; keep its "
                              "predictions (the evaluation protocol does) rather than the model")
        return super().save_pretrained(directory, extra=extra)


def _backbone_and_cfg(cfg: FusionConfig, **changes):
    cfg = replace(copy.deepcopy(cfg), **changes).validate()
    return cfg, load_configured_backbone(cfg)


def build_respllm(cfg: FusionConfig, in_dim: int, head: str = "flatten", d_ff: int = 32, seed: int = 0,
                  tasks: dict | None = None) -> EndToEndModel:
    """RespLLM: Linear(in_dim, d_llm) projector + LoRA + FlattenHead (or last-token head), RespLLM prompts."""
    cfg, backbone = _backbone_and_cfg(cfg, prompt_style="respllm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = Projector(ProjectorConfig(kind="linear", in_dim=in_dim, out_dim=backbone.hidden_size, final="none"))
        return EndToEndModel(cfg, proj, backbone=backbone, head=head, d_ff=d_ff, tasks=tasks,
                             provenance={"note": "RespLLM baseline: linear projector trained end to end, no stage 1"})


def build_no_alignment(cfg: FusionConfig, in_dim: int, hidden: int = 1024, final: str = "layernorm",
                       dropout: float = 0.1, seed: int = 0, tasks: dict | None = None) -> EndToEndModel:
    """RespiraMFM with its MLP projector randomly initialised and trained end to end (no stage 1)."""
    cfg, backbone = _backbone_and_cfg(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = Projector(ProjectorConfig(kind="mlp", in_dim=in_dim, hidden=hidden, out_dim=backbone.hidden_size,
                                         dropout=dropout, final=final))
        return EndToEndModel(cfg, proj, backbone=backbone, head="last", tasks=tasks,
                             provenance={"note": "no-alignment ablation: random-init projector trained end to end"})


# --------------------------------------------------------------------------- training


@dataclass
class EndToEndConfig:
    lr: float = 1e-4             # RespLLM: Adam 1e-4, no weight decay, no schedule
    optimizer: str = "adam"      # adam | adamw
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 40
    mixing: str = "proportional"  # RespLLM's sampler; "concat" = RespiraMFM's
    select_metric: str = "auroc"  # RespiraMFM's rule (mean validation AUROC); "loss" = validation CE
    patience: int = 2
    eval_batch_size: int = 32
    precision: str = ""           # fp32 | bf16 (autocast); "" = the protocol's fine-tuning precision
    seed: int = 42

    def validate(self) -> "EndToEndConfig":
        if self.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"optimizer must be adam or adamw, got {self.optimizer!r}")
        if self.select_metric not in ("auroc", "loss"):
            raise ConfigError(f"select_metric must be auroc or loss, got {self.select_metric!r}")
        if self.precision not in ("", "fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.batch_size < 1 or self.epochs < 1 or self.patience < 0 or not self.lr > 0:
            raise ConfigError("batch_size and epochs must be >= 1, patience >= 0, lr > 0")
        return self


class _RowView:
    """Indexable like ``Prepared.audio`` but serving only the rows projected for this batch."""

    def __init__(self, rows: list[int], projected: torch.Tensor):
        self._at = {r: j for j, r in enumerate(rows)}
        self._projected = projected

    def __getitem__(self, row: int) -> torch.Tensor:
        return self._projected[self._at[row]]


def prepare_raw(model: EndToEndModel, examples):
    """``Prepared`` examples whose ``audio`` holds the RAW encoder embeddings (N_rows, n_tokens, in_dim)."""
    empty = replace(examples, audio=examples.audio[:0])  # token ids only; audio is projected per batch
    prep = prepare_examples(model, empty)
    raw = torch.from_numpy(np.ascontiguousarray(examples.audio, dtype=np.float32))
    if raw.ndim == 2:
        raw = raw.unsqueeze(1)
    if len(raw) and raw.shape[1:] != (model.cfg.n_audio_tokens, model.in_dim):
        raise DataError(f"audio embeddings have shape {tuple(raw.shape[1:])}, the model expects "
                        f"({model.cfg.n_audio_tokens}, {model.in_dim})")
    return replace(prep, audio=raw if model.cfg.mode != "text_only" else None)


def resolved_batch(model: EndToEndModel, prep, idx) -> list:
    """Resolved samples of ``idx`` with their audio projected now (with autograd if enabled)."""
    rows = sorted({prep.rows[i] for i in idx if prep.rows[i] is not None})
    view = _RowView(rows, model.project_audio(prep.audio[rows])) if rows else None
    return resolved_items(model, replace(prep, audio=view), list(idx))


def predict_prepared(model: EndToEndModel, prep, batch_size: int = 32) -> np.ndarray:
    """P(condition present) for every example of ``prep`` (eval mode, no grad)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            resolved = resolved_batch(model, prep, range(len(prep)))
        return predict_proba(model, resolved, batch_size=batch_size)
    finally:
        model.train(was)


def _evaluate(model, prep, batch_size: int, acc) -> dict:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            projected = model.project_audio(prep.audio) if prep.audio is not None else None
    finally:
        model.train(was)
    return validation_metrics(model, replace(prep, audio=projected), acc, batch_size)


def end_to_end_budget(cfg: EndToEndConfig) -> Budget:
    """The engine's budget: Adam(W) at a constant rate, one validation per epoch, selection with patience."""
    optim = OptimConfig(optimizer=cfg.optimizer, lr=cfg.lr, betas=[0.9, 0.999], eps=1e-8,
                        weight_decay=cfg.weight_decay, schedule="constant")
    key, mode = SELECT_KEYS[cfg.select_metric]
    return Budget(optim=optim, epochs=cfg.epochs, batch_size=cfg.batch_size, eval_every=0, select_metric=key,
                  select_mode=mode, patience=cfg.patience)


class EndToEndTask(TrainTask):
    """LoRA + head + projector for the engine: each batch's audio is projected with autograd."""

    evaluates = True

    def __init__(self, model: EndToEndModel, train, val, cfg: EndToEndConfig, acc):
        self.model, self.train, self.val, self.cfg, self.acc = model, train, val, cfg, acc
        self.plans = [plan_epoch(train.tasks, train.lengths, cfg.batch_size, cfg.mixing, cfg.seed, e)
                      for e in range(cfg.epochs)]

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.plans[epoch])

    def batches(self, epoch: int, start: int):
        return self.plans[epoch][start:]

    def compute_loss(self, batch):
        with self.acc.autocast():  # bf16 for the training forward only; validation stays fp32
            logits = shared_prefix_logits(self.model, resolved_batch(self.model, self.train, batch.tolist()))
        return torch.nn.functional.cross_entropy(logits.float(), self.train.labels[batch].to(logits.device)), {}

    def evaluate(self) -> dict:
        return _evaluate(self.model, self.val, self.cfg.eval_batch_size, self.acc)


def train_end_to_end(model: EndToEndModel, data, cfg: EndToEndConfig, callbacks=()) -> dict:
    """Train LoRA + head + projector on ``data.train``; keep the best state on ``data.val``.

    ``data`` is a :class:`respiramfm.fusion.data.FinetuneData` (it holds no test record).
    Returns ``{"best": eval row, "evals": [...], "steps": n}``; ``model`` ends in the best state.
    The loop is the shared engine's (:mod:`respiramfm.training`), in memory (no checkpoints).
    """
    cfg.validate()
    train, val = prepare_raw(model, data.train), prepare_raw(model, data.val)
    acc = make_accelerator("cpu" if model.device.type == "cpu" else "auto", cfg.precision or "no")
    run = RunSettings(name="end-to-end", progress=False, dropout_seed=cfg.seed)
    with torch.random.fork_rng(devices=[]):
        trainer = Trainer(EndToEndTask(model, train, val, cfg, acc), end_to_end_budget(cfg), run, accelerator=acc,
                          callbacks=callbacks)
        st = trainer.fit()
    model.eval()
    evals = trainer.evaluations()
    best = next(r for r in reversed(evals) if r["step"] == st["best_step"])
    return {"best": best, "evals": evals, "steps": st["step"], "selected_on": "validation"}


__all__ = ["EndToEndConfig", "EndToEndModel", "EndToEndTask", "end_to_end_budget", "HEADS", "build_no_alignment", "build_respllm", "predict_prepared",
           "prepare_raw", "resolved_batch", "train_end_to_end"]
