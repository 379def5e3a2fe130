"""Which evaluation systems exist, and where each one is built, trained and scored.

A system is a function ``fit_predict(data, seed, work_dir, options) -> {task: {record_id: prob}}``
(``data`` is an :class:`respiramfm.evaluate.data.EvalData`): it fits on the train split of the
supervised tasks, selects on validation, and scores the test records of every task.

The built-in systems are named here with the module that implements them; a module is imported
only when its system is asked for, so this table is the one place that lists them and this module
imports nothing else of the package. :func:`register_system` adds (or replaces) a system at run
time, e.g. a test's cheap classifier.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from respiramfm.errors import ConfigError

SystemFn = Callable[[Any, int, Path, dict], dict]

BTS_LABEL = "BTS-style (frozen features + linear; the paper's BTS fine-tunes CLAP)"

# name -> ("module:function", description). Order: the protocol's own model, then baselines and ablations.
BUILTIN: dict[str, tuple[str, str]] = {
    "respiramfm": ("respiramfm.evaluate.systems:respiramfm_system",
                   "RespiraMFM: aligned projector + LLM with LoRA (stage 2)"),
    "respllm": ("respiramfm.evaluate.baselines:respllm",
                "RespLLM re-implemented: linear projector + LoRA trained end to end, FlattenHead"),
    "no_alignment": ("respiramfm.evaluate.baselines:no_alignment",
                     "RespiraMFM without stage 1 (ours): random-init MLP+LayerNorm projector trained end to end"),
    "no_alignment_linear": ("respiramfm.evaluate.baselines:no_alignment_linear",
                            "RespiraMFM without stage 1 (the paper's ablation): random-init linear projector "
                            "trained end to end"),
    "audio_only": ("respiramfm.evaluate.baselines:audio_only", "RespiraMFM trained and tested on audio only"),
    "text_only": ("respiramfm.evaluate.baselines:text_only",
                  "RespiraMFM trained and tested on the context text only"),
    "missing_text": ("respiramfm.evaluate.baselines:missing_text",
                     "multimodal RespiraMFM tested with the text missing"),
    "bts_frozen": ("respiramfm.evaluate.baselines:bts_frozen", BTS_LABEL),
    "meta_only": ("respiramfm.evaluate.baselines_meta:meta_only",
                  "metadata only (device, location, age, sex -> logistic regression): a shortcut detector"),
    "qwen2_audio": ("respiramfm.evaluate.qwen2audio:fit_predict",
                    "Qwen2-Audio, generative (user-supplied weights)"),
}

_REGISTERED: dict[str, tuple[SystemFn, str]] = {}


def register_system(name: str, fn: SystemFn, description: str = "") -> None:
    """Add a system under ``name`` (a built-in of that name is replaced)."""
    if not callable(fn):
        raise ConfigError(f"system {name!r} is not callable")
    _REGISTERED[name] = (fn, description)


def system_names() -> list[str]:
    return [*BUILTIN, *(n for n in _REGISTERED if n not in BUILTIN)]


def describe(name: str) -> str:
    if name in _REGISTERED:
        return _REGISTERED[name][1]
    if name in BUILTIN:
        return BUILTIN[name][1]
    raise ConfigError(f"unknown system {name!r}; known: {system_names()}")


def get_system(name: str) -> SystemFn:
    """The ``fit_predict`` function of ``name`` (its module is imported now)."""
    if name in _REGISTERED:
        return _REGISTERED[name][0]
    if name not in BUILTIN:
        raise ConfigError(f"unknown system {name!r}; known: {system_names()}")
    target = BUILTIN[name][0]
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:  # an optional module left out of a trimmed install
        if exc.name != module:
            raise
        raise ConfigError(f"system {name!r} is not available: module {module} is not installed") from None


def available(names: list[str]) -> list[str]:
    """The systems of ``names`` that can be loaded here, in order (a missing optional module drops one)."""
    keep = []
    for name in names:
        try:
            get_system(name)
        except ConfigError:
            continue
        keep.append(name)
    return keep


__all__ = ["BTS_LABEL", "BUILTIN", "SystemFn", "available", "describe", "get_system", "register_system",
           "system_names"]
