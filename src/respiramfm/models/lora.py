"""LoRA on the inner LLM, with per-architecture target modules and strict adapter loading.

Why per-architecture targets: the official code asks PEFT for ``o_proj`` on
Phi-2, which has none (its attention output is ``dense``), so only q/k/v were
adapted (docs/paper.md §4). Here each family names its own projections:

* phi: ``q_proj, k_proj, v_proj, dense`` (+ ``fc1, fc2`` with ``mlp=True``);
* llama / qwen2 / mistral family: ``q_proj, k_proj, v_proj, o_proj`` (+ ``gate_proj, up_proj, down_proj``);
* gpt2: ``attn.c_attn, attn.c_proj`` (+ ``mlp.c_fc, mlp.c_proj``) — qualified names, because GPT-2
  reuses ``c_proj`` for the attention output and the MLP output.

LoRA wraps the inner decoder (``LlamaModel``, ``PhiModel``...) only, never the
LM head or our classification head (docs/paper.md §8). PEFT's own loader tolerates
missing keys with a warning; :func:`load_adapter_strict` checks every key and
shape first and refuses to load anything that does not match.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from respiramfm.errors import CheckpointError, ConfigError
from respiramfm.models.base import compare_shapes, load_safetensors, safetensors_shapes
from respiramfm.models.configuration import LoraSettings
from respiramfm.models.files import check_directory, read_json

ATTENTION_TARGETS: dict[str, list[str]] = {
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
}
MLP_TARGETS: dict[str, list[str]] = {
    "phi": ["fc1", "fc2"],
    "llama": ["gate_proj", "up_proj", "down_proj"],
    "gpt2": ["mlp.c_fc", "mlp.c_proj"],
}
# Architectures laid out like Llama (q/k/v/o attention, gated MLP).
LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "olmo", "smollm3")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LORA_FIELDS = frozenset(f.name for f in dataclasses.fields(LoraConfig) if f.init)
RESERVED_FIELDS = frozenset({"r", "lora_alpha", "lora_dropout", "target_modules", "bias"})


def _family(arch: str) -> str:
    if arch in ATTENTION_TARGETS:
        return arch
    if arch in LLAMA_FAMILY:
        return "llama"
    raise ConfigError(f"no default LoRA targets for architecture {arch!r}; set lora.target_modules explicitly")


def target_modules(arch: str, mlp: bool = False) -> list[str]:
    """Default LoRA target module names for a ``config.model_type``."""
    fam = _family(arch)
    return list(ATTENTION_TARGETS[fam]) + (list(MLP_TARGETS[fam]) if mlp else [])


def lora_config(settings: LoraSettings, arch: str):
    """The ``peft.LoraConfig`` for ``settings`` on an architecture (no task type: we wrap a bare decoder).

    ``settings.extra`` may only name further ``LoraConfig`` fields (not the ones set here); a
    key PEFT does not know, or a value it refuses, is a ConfigError.
    """
    check_extra(settings.validate())
    targets = list(settings.target_modules) if settings.target_modules else target_modules(arch, settings.mlp)
    kwargs = dict(settings.extra)
    if _family_or_none(arch) == "gpt2":
        kwargs.setdefault("fan_in_fan_out", True)  # GPT-2's Conv1D stores weights transposed
    try:
        return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=targets, bias="none", **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"lora.extra is not accepted by peft.LoraConfig: {exc}") from None


def check_extra(settings: LoraSettings) -> LoraSettings:
    """Refuse ``lora.extra`` keys that are not further ``peft.LoraConfig`` fields (or that we set ourselves)."""
    unknown = sorted(set(settings.extra) - (LORA_FIELDS - RESERVED_FIELDS))
    if unknown:
        raise ConfigError(f"lora.extra: unknown or reserved LoraConfig key(s) {[k[:80] for k in unknown][:10]}")
    return settings


def _family_or_none(arch: str) -> str | None:
    try:
        return _family(arch)
    except ConfigError:
        return None


def apply_lora(decoder: torch.nn.Module, settings: LoraSettings, arch: str):
    """Wrap ``decoder`` in a PEFT model; only the LoRA matrices stay trainable.

    Raises ConfigError when a target matches no module (PEFT's message is kept).
    """
    cfg = lora_config(settings, arch)
    if settings.top_layers:  # placement: adapt only the top k decoder layers
        n = int(decoder.config.num_hidden_layers)
        if settings.top_layers > n:
            raise ConfigError(f"lora.top_layers is {settings.top_layers} but the decoder has {n} layers")
        cfg.layers_to_transform = list(range(n - settings.top_layers, n))
        cfg.layers_pattern = ["layers", "h"]  # the layer-list names of the supported decoders
    try:
        with warnings.catch_warnings():  # PEFT queries an attribute transformers has deprecated
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(decoder, cfg)
    except ValueError as exc:
        raise ConfigError(f"LoRA targets {sorted(cfg.target_modules)} do not fit {arch}: {exc}") from None
    return model


def injected_modules(peft_model) -> list[str]:
    """Names (relative to the decoder) of every module that received a LoRA adapter."""
    prefix = "base_model.model."
    out = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            out.append(name[len(prefix):] if name.startswith(prefix) else name)
    return sorted(out)


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter tensors exactly as PEFT saves them (keys without the adapter name)."""
    return get_peft_model_state_dict(peft_model)


def check_adapter_dir(directory: Path, peft_model, arch: str, settings: LoraSettings) -> list[str]:
    """Problems that would make ``directory`` load incompletely into ``peft_model`` ([] when fine).

    Files are read as untrusted input (:mod:`respiramfm.models.files`): a missing, non-regular,
    oversized, non-UTF-8, too deeply nested or wrongly typed file raises CheckpointError.
    """
    check_directory(directory, "adapter/")
    cfg_path, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    saved_cfg = read_json(cfg_path, f"adapter/{ADAPTER_CONFIG}")
    expected_cfg = lora_config(settings, arch)
    problems: list[str] = []
    for key, want in (("r", expected_cfg.r), ("lora_alpha", expected_cfg.lora_alpha),
                      ("target_modules", sorted(expected_cfg.target_modules))):
        got = saved_cfg.get(key)
        got = sorted(map(str, got)) if isinstance(got, list) else got
        if got != want:
            problems.append(f"{cfg_path.name}: {key} is {repr(got)[:80]}, the model config says {want!r}")
    expected = {k: tuple(v.shape) for k, v in adapter_state(peft_model).items()}
    found = safetensors_shapes(weights, f"adapter/{ADAPTER_WEIGHTS}")
    problems += compare_shapes("adapter", expected, found)
    return problems


def load_adapter_strict(directory: Path, peft_model) -> None:
    """Load checked adapter weights; raises CheckpointError if PEFT reports anything left out."""
    state = load_safetensors(directory / ADAPTER_WEIGHTS, f"adapter/{ADAPTER_WEIGHTS}")
    result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise CheckpointError(f"adapter did not load completely: missing {missing}, unexpected {unexpected}",
                              path=directory)
