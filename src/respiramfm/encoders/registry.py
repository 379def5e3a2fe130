"""Registry of audio encoders that ``respiramfm embed`` (and everything after it) can use.

Why a registry: the embedding store, the aligner and the baselines must not care
which encoder produced a vector, only *which one* (for the cache key) and how
wide it is. Every entry bundles the encoder with the front end it expects, so a
name alone fixes the whole audio -> vector path.

An *encoder object* (what a builder returns) offers

* ``name`` (str) and ``out_dim`` (int),
* ``weights_hash`` (str): sha256 of its weights, or of its settings when it has
  none; the store uses it in the cache key, so changing weights never reuses
  stale vectors,
* ``encode(specs: list[np.ndarray]) -> np.ndarray`` of shape (B, out_dim), float32,
  for (T_i, n_mels) spectrograms of any lengths (it groups equal lengths itself),
* optionally ``encode_tokens(specs) -> (B, n_tokens, out_dim)`` (multi-token audio
  for RespLLM-style models; OPERA-CT's 64-token grid).

Built-in entries: ``opera-ct`` (needs a checkpoint) and ``logmel-stats``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from respiramfm.audio import FrontendConfig
from respiramfm.errors import ConfigError


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one encoder and what it needs.

    ``builder(checkpoint, device)`` returns an encoder object (see module doc).
    ``out_dim`` is ``None`` when it depends on the checkpoint (read it from the
    built object). ``frontend`` is the front-end configuration the encoder was
    trained with; callers may vary crop/duration via :func:`dataclasses.replace`.
    """

    name: str
    builder: Callable[[str | None, str], Any]
    out_dim: int | None
    frontend: FrontendConfig
    description: str
    needs_checkpoint: bool = False
    supports_tokens: bool = False

    def build(self, checkpoint: str | None = None, device: str = "cpu") -> Any:
        """Build the encoder, checking the checkpoint requirement first."""
        if self.needs_checkpoint and not checkpoint:
            raise ConfigError(f"encoder {self.name!r} needs a checkpoint (--checkpoint PATH)")
        if not self.needs_checkpoint and checkpoint:
            raise ConfigError(f"encoder {self.name!r} takes no checkpoint (got {checkpoint!r})")
        return self.builder(checkpoint, device)


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec, overwrite: bool = False) -> EncoderSpec:
    """Add an encoder; re-registering a name is an error unless ``overwrite``."""
    if not isinstance(spec, EncoderSpec):
        raise TypeError(f"expected an EncoderSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not overwrite:
        raise ConfigError(f"encoder {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_encoder(name: str) -> EncoderSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}") from None


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def build_encoder(name: str, checkpoint: str | None = None, device: str = "cpu") -> Any:
    """Shorthand for ``get_encoder(name).build(checkpoint, device)``."""
    return get_encoder(name).build(checkpoint, device)


# --------------------------------------------------------------------------- OPERA-CT


class OperaCTEncoder:
    """Adapter from the OPERA-CT ``nn.Module`` to the encoder-object interface.

    Spectrograms of equal length are stacked into one forward pass (at most
    ``max_batch`` at a time); lengths differ only for clips longer than the
    front end's ``input_sec``. Groups are visited in a fixed order (length, then
    position) so a given input list always runs through the same batches, which
    keeps results bit-reproducible.
    """

    name = "opera-ct"

    def __init__(self, model, device: str = "cpu", max_batch: int = 32):
        import torch

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.out_dim = int(model.out_dim)
        self.weights_hash = str(model.weights_sha256)
        self.max_batch = int(max_batch)

    def _run(self, specs: list[np.ndarray], fn: Callable, tail: tuple[int, ...]) -> np.ndarray:
        import torch

        out = np.empty((len(specs), *tail), dtype=np.float32)
        by_len: dict[int, list[int]] = {}
        for i, s in enumerate(specs):
            if np.ndim(s) != 2:
                raise ValueError(f"spectrogram {i} has shape {np.shape(s)}, expected (T, n_mels)")
            by_len.setdefault(int(np.shape(s)[0]), []).append(i)
        with torch.inference_mode():
            for length in sorted(by_len):
                idx = by_len[length]
                for start in range(0, len(idx), self.max_batch):
                    chunk = idx[start:start + self.max_batch]
                    x = torch.from_numpy(np.stack([np.asarray(specs[i], dtype=np.float32) for i in chunk]))
                    y = fn(x.to(self.device))
                    out[chunk] = y.float().cpu().numpy()
        return out

    def encode(self, specs: list[np.ndarray]) -> np.ndarray:
        """(B, out_dim) pooled latents (mean of the 64 final tokens)."""
        return self._run(specs, self.model, (self.out_dim,))

    def encode_tokens(self, specs: list[np.ndarray]) -> np.ndarray:
        """(B, 64, out_dim) token grid after the final norm (RespLLM multi-token audio)."""
        return self._run(specs, self.model.forward_tokens, (64, self.out_dim))


def _build_opera_ct(checkpoint: str | None, device: str) -> OperaCTEncoder:
    from respiramfm.models.opera_ct import from_checkpoint

    return OperaCTEncoder(from_checkpoint(checkpoint, device=device), device=device)


def _build_logmel(checkpoint: str | None, device: str):
    from respiramfm.encoders.logmel import LogMelStatsEncoder

    return LogMelStatsEncoder(n_mels=_OPERA_FRONTEND.n_mels)


# The OPERA-CT front end as RespiraMFM uses it: 16 kHz, 8 s, whole clip, 64 mels.
_OPERA_FRONTEND = FrontendConfig(sr=16000, input_sec=8.0, crop="whole", n_mels=64)

register_encoder(EncoderSpec(
    name="opera-ct",
    builder=_build_opera_ct,
    out_dim=None,
    frontend=_OPERA_FRONTEND,
    description="frozen OPERA-CT (HTS-AT) encoder; --checkpoint: released encoder-operaCT.ckpt, a safetensors "
                "export, or a `respiramfm pretrain-audio` output; 768-d for the released weights",
    needs_checkpoint=True,
    supports_tokens=True,
))

register_encoder(EncoderSpec(
    name="logmel-stats",
    builder=_build_logmel,
    out_dim=384,
    frontend=_OPERA_FRONTEND,
    description="non-learned baseline: per-mel-bin mean/std/p10/p50/p90/flux of the OPERA log-mel (384-d)",
))
