"""LoRA on the inner LLM, with per-architecture target modules and strict adapter loading.

Why per-architecture targets: the official code asks PEFT for ``o_proj`` on
Phi-2, which has none (its attention output is ``dense``), so only q/k/v were
adapted (REFERENCE §4). Here each family names its own projections:

* phi: ``q_proj, k_proj, v_proj, dense`` (+ ``fc1, fc2`` with ``mlp=True``);
* llama / qwen2 / mistral family: ``q_proj, k_proj, v_proj, o_proj`` (+ ``gate_proj, up_proj, down_proj``);
* gpt2: ``attn.c_attn, attn.c_proj`` (+ ``mlp.c_fc, mlp.c_proj``) — qualified names, because GPT-2
  reuses ``c_proj`` for the attention output and the MLP output.

LoRA wraps the inner decoder (``LlamaModel``, ``PhiModel``...) only, never the
LM head or our classification head (REFERENCE §8). PEFT's own loader tolerates
missing keys with a warning; :func:`load_adapter_strict` checks every key and
shape first and refuses to load anything that does not match.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from respiramfm.errors import CheckpointError, ConfigError

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


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (paper: r 16, alpha 32, dropout 0.1)."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    mlp: bool = False  # also adapt the MLP projections
    target_modules: list[str] | None = None  # explicit override of the per-architecture defaults
    extra: dict = field(default_factory=dict)  # further LoraConfig keyword arguments

    def validate(self) -> "LoraSettings":
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"lora.r and lora.alpha must be positive, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must lie in [0, 1), got {self.dropout}")
        return self


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
    """The ``peft.LoraConfig`` for ``settings`` on an architecture (no task type: we wrap a bare decoder)."""
    from peft import LoraConfig

    settings.validate()
    targets = list(settings.target_modules) if settings.target_modules else target_modules(arch, settings.mlp)
    kwargs = dict(settings.extra)
    if _family_or_none(arch) == "gpt2":
        kwargs.setdefault("fan_in_fan_out", True)  # GPT-2's Conv1D stores weights transposed
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, bias="none", **kwargs)


def _family_or_none(arch: str) -> str | None:
    try:
        return _family(arch)
    except ConfigError:
        return None


def apply_lora(decoder: torch.nn.Module, settings: LoraSettings, arch: str):
    """Wrap ``decoder`` in a PEFT model; only the LoRA matrices stay trainable.

    Raises ConfigError when a target matches no module (PEFT's message is kept).
    """
    from peft import get_peft_model

    cfg = lora_config(settings, arch)
    try:
        with warnings.catch_warnings():  # PEFT queries an attribute transformers has deprecated
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(decoder, cfg)
    except ValueError as exc:
        raise ConfigError(f"LoRA targets {sorted(cfg.target_modules)} do not fit {arch}: {exc}") from None
    return model


def injected_modules(peft_model) -> list[str]:
    """Names (relative to the decoder) of every module that received a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    out = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            out.append(name[len(prefix):] if name.startswith(prefix) else name)
    return sorted(out)


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter tensors exactly as PEFT saves them (keys without the adapter name)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


def check_adapter_dir(directory: Path, peft_model, arch: str, settings: LoraSettings) -> list[str]:
    """Problems that would make ``directory`` load incompletely into ``peft_model`` ([] when fine)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    problems: list[str] = []
    cfg_path, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    try:
        saved_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{cfg_path.name} is missing"]
    except json.JSONDecodeError as exc:
        return [f"{cfg_path.name} is not valid JSON ({exc.msg})"]
    expected_cfg = lora_config(settings, arch)
    for key, want in (("r", expected_cfg.r), ("lora_alpha", expected_cfg.lora_alpha),
                      ("target_modules", sorted(expected_cfg.target_modules))):
        got = saved_cfg.get(key)
        got = sorted(got) if isinstance(got, list) else got
        if got != want:
            problems.append(f"{cfg_path.name}: {key} is {got!r}, the model config says {want!r}")
    expected = {k: tuple(v.shape) for k, v in adapter_state(peft_model).items()}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as fh:
            found = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except FileNotFoundError:
        return problems + [f"{weights.name} is missing"]
    except (SafetensorError, OSError) as exc:
        return problems + [f"{weights.name} is unreadable ({exc})"]
    problems += compare_shapes("adapter", expected, found)
    return problems


def compare_shapes(what: str, expected: dict[str, tuple], found: dict[str, tuple]) -> list[str]:
    out = [f"{what}: missing tensor {k}" for k in sorted(set(expected) - set(found))]
    out += [f"{what}: unexpected tensor {k}" for k in sorted(set(found) - set(expected))]
    out += [f"{what}: {k} has shape {found[k]}, expected {expected[k]}"
            for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
    return out


def load_adapter_strict(directory: Path, peft_model) -> None:
    """Load checked adapter weights; raises CheckpointError if PEFT reports anything left out."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(directory / ADAPTER_WEIGHTS))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"non-finite adapter tensors: {bad}", path=directory / ADAPTER_WEIGHTS)
    result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise CheckpointError(f"adapter did not load completely: missing {missing}, unexpected {unexpected}",
                              path=directory)
