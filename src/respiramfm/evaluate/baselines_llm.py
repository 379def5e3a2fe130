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
  ``n_audio_tokens`` AUDIO positions, flattened channel-major ``c * P + p``, then
  ``Linear(32 * P, 2)``, dropout 0) or our last-token linear head. Differences from the
  released code, all deliberate:

  - we pass a correct attention mask (RespLLM passed none, so its eos pads were attended);
  - the head reads the audio positions wherever ``model.order`` puts the audio (RespLLM's
    [prompt, context, audio] has them last, which is what its "last ``P`` positions" meant);
  - OPERA-CT runs with its real weights in eval mode (the release never loaded them);
  - model selection uses the RespiraMFM rule (mean validation AUROC, or validation loss
    with ``select_metric="loss"``; RespLLM used early stopping on summed validation loss,
    patience 2) — never test;
  - it trains with the run's shared budget (:mod:`respiramfm.evaluate.budget`) like every other
    system, not RespLLM's (Adam 1e-4, batch 32, 40 epochs, proportional mixing, patience 2), so
    a comparison measures the model, not the optimiser; an explicit per-system override can
    restore RespLLM's own budget;
  - the LLM is whatever backbone the comparison uses (the release used Llama-class 7-8B models).

* **No alignment** (:func:`build_no_alignment`): stage 2 without stage 1, with RespiraMFM's
  prompt, pooling and head and a randomly initialised projector trained end to end with the
  LoRA: ``projector="linear"`` is the paper's ablation (one ``Linear(in_dim, d_llm)``);
  ``projector="mlp"`` is ours, RespiraMFM's own MLP+LayerNorm projector untrained by stage 1,
  which isolates stage 1 from the projector's shape.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from respiramfm.errors import ConfigError, DataError
from respiramfm.evaluate.budget import check_budget
from respiramfm.fusion.data import plan_epoch, prepare_examples, resolved_items
from respiramfm.fusion.infer import predict_proba, shared_prefix_logits, validation_metrics
from respiramfm.models.configuration import FusionConfig, ProjectorConfig
from respiramfm.models.fusion import RespiraMFM, load_configured_backbone
from respiramfm.models.projector import Projector
from respiramfm.training.config import Budget, RunSettings
from respiramfm.training.engine import TrainTask, Trainer, make_accelerator

HEADS = ("last", "flatten")
PROJECTORS = ("mlp", "linear")  # no-alignment ablation: ours (MLP + LayerNorm) | the paper's (one Linear)


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

    def flatten_features(self, hidden: torch.Tensor, audio_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) states -> (B, d_ff * P): channels ``:d_ff`` at each row's ``P`` audio positions
        (``audio_mask``, the batch's (B, L) audio columns, whatever ``model.order`` is), channel-major."""
        p = self.cfg.n_audio_tokens
        mask = audio_mask.to(hidden.device).bool()
        counts = mask.sum(dim=1)
        if bool((counts != p).any()):
            raise DataError(f"FlattenHead reads {p} audio positions per sequence; the batch has "
                            f"{sorted(set(counts.tolist()))} (every RespLLM input needs its audio)")
        pos = torch.nonzero(mask, as_tuple=True)[1].reshape(hidden.shape[0], p)  # row-major: ascending per row
        rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        states = hidden[rows, pos][..., : self.d_ff]          # (B, P, d_ff)
        return states.transpose(1, 2).reshape(hidden.shape[0], self.d_ff * p)  # index c * P + p

    def forward_embeds(self, inputs_embeds, attention_mask, position_ids, last_index, past_key_values=None,
                       output_attentions: bool = False, audio_mask: torch.Tensor | None = None):
        if self.head_kind == "last":
            return super().forward_embeds(inputs_embeds, attention_mask, position_ids, last_index,
                                          past_key_values, output_attentions)
        if audio_mask is None:
            raise ConfigError("the FlattenHead reads the audio positions: this forward path gives no audio_mask")
        hidden, _ = self._run(inputs_embeds, attention_mask, position_ids, past_key_values, output_attentions)
        return self.head(self.flatten_features(hidden, audio_mask).to(self.head.weight.dtype))

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
                       dropout: float = 0.1, seed: int = 0, tasks: dict | None = None,
                       projector: str = "mlp") -> EndToEndModel:
    """RespiraMFM without stage 1: a random-init projector trained end to end with the LoRA.

    ``projector="linear"``: one ``Linear(in_dim, d_llm)`` (the paper's ablation; ``hidden``,
    ``final`` and ``dropout`` do not apply); ``"mlp"``: RespiraMFM's own projector (ours).
    """
    if projector not in PROJECTORS:
        raise ConfigError(f"projector must be one of {PROJECTORS}, got {projector!r}")
    cfg, backbone = _backbone_and_cfg(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if projector == "linear":
            pcfg = ProjectorConfig(kind="linear", in_dim=in_dim, out_dim=backbone.hidden_size, final="none")
        else:
            pcfg = ProjectorConfig(kind="mlp", in_dim=in_dim, hidden=hidden, out_dim=backbone.hidden_size,
                                   dropout=dropout, final=final)
        return EndToEndModel(cfg, Projector(pcfg), backbone=backbone, head="last", tasks=tasks,
                             provenance={"note": f"no-alignment ablation: random-init {projector} projector "
                                                 "trained end to end"})


# --------------------------------------------------------------------------- training


@dataclass
class EndToEndConfig:
    """How an end-to-end run is carried out; WHAT it trains with is the shared :class:`Budget`."""

    eval_batch_size: int = 32
    precision: str = ""           # fp32 | bf16 (autocast); "" = fp32 (the protocol passes stage 2's)
    seed: int = 42
    group_by_task: bool = True    # as stage 2's (the protocol passes the run's finetune settings)
    group_by_length: bool = True

    def validate(self) -> "EndToEndConfig":
        if self.precision not in ("", "fp32", "bf16", "auto"):
            raise ConfigError(f"precision must be fp32, bf16 or auto, got {self.precision!r}")
        if self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size must be >= 1")
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


class EndToEndTask(TrainTask):
    """LoRA + head + projector for the engine: each batch's audio is projected with autograd.

    Step batches are planned like stage 2's (:func:`respiramfm.fusion.data.plan_epoch` with the
    budget's batch, accumulation and mixing), and the step loss is the mean over the step batch.
    """

    evaluates = True

    def __init__(self, model: EndToEndModel, train, val, budget: Budget, cfg: EndToEndConfig, acc):
        self.model, self.train, self.val, self.cfg, self.acc = model, train, val, cfg, acc
        step = budget.batch_size * budget.grad_accum
        self.plans = [plan_epoch(train.tasks, train.lengths, step, budget.mixing, cfg.seed, e, cfg.group_by_task,
                                 cfg.group_by_length, min_size=budget.grad_accum) for e in range(budget.epochs)]
        self._scale = 1.0

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.plans[epoch])

    def batches(self, epoch: int, start: int):
        return self.plans[epoch][start:]

    def micro_batches(self, batch, accum: int) -> Sequence:
        self._scale = 1.0 / len(batch)
        return super().micro_batches(batch, accum)

    def compute_loss(self, batch):
        with self.acc.autocast():  # bf16 for the training forward only; validation stays fp32
            logits = shared_prefix_logits(self.model, resolved_batch(self.model, self.train, batch.tolist()))
        labels = self.train.labels[batch].to(logits.device)
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum") * self._scale, {}

    def evaluate(self) -> dict:
        return _evaluate(self.model, self.val, self.cfg.eval_batch_size, self.acc)


def train_end_to_end(model: EndToEndModel, data, budget: Budget, cfg: EndToEndConfig | None = None,
                     callbacks=()) -> dict:
    """Train LoRA + head + projector on ``data.train`` under ``budget``; keep the best state on ``data.val``.

    ``data`` is a :class:`respiramfm.fusion.data.FinetuneData` (it holds no test record);
    ``budget`` is the run's shared one (:mod:`respiramfm.evaluate.budget`), the same every
    other system trains with. Returns ``{"best": eval row, "evals": [...], "steps": n}``;
    ``model`` ends in the best state. The loop is the shared engine's (:mod:`respiramfm.training`),
    in memory (no checkpoints).
    """
    cfg = (cfg or EndToEndConfig()).validate()
    check_budget(budget)
    train, val = prepare_raw(model, data.train), prepare_raw(model, data.val)
    acc = make_accelerator("cpu" if model.device.type == "cpu" else "auto", cfg.precision or "no")
    run = RunSettings(name="end-to-end", progress=False, dropout_seed=cfg.seed)
    with torch.random.fork_rng(devices=[]):
        trainer = Trainer(EndToEndTask(model, train, val, budget, cfg, acc), budget, run, accelerator=acc,
                          callbacks=callbacks)
        st = trainer.fit()
    model.eval()
    evals = trainer.evaluations()
    best = next(r for r in reversed(evals) if r["step"] == st["best_step"])
    return {"best": best, "evals": evals, "steps": st["step"], "selected_on": "validation"}


__all__ = ["EndToEndConfig", "EndToEndModel", "EndToEndTask", "HEADS", "PROJECTORS", "build_no_alignment",
           "build_respllm", "predict_prepared", "prepare_raw", "resolved_batch", "train_end_to_end"]
