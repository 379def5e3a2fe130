"""The frozen OPERA-CT encoder: strict checkpoint loading, weight identity and the fixture weight rule.

``from_checkpoint`` accepts either key style:

* the released Lightning file: HTS-AT keys under ``encoder.encoder.htsat.``; the other keys of that file
  are the COLA projection head, ignored by the name pattern ``IGNORED_HEAD`` (``g.*``, ``layer_norm.*``,
  ``linear.*``, ``middle.*``, with or without a leading ``encoder.``); any other key is an error;
* bare HTS-AT keys (our converted safetensors, our own pretraining output).

Loading is strict: only ``spectrogram_extractor.*`` and ``logmel_extractor.*`` (the original's built-in
front end, which runs outside the encoder here) may be dropped; anything missing, unexpected or
mis-shaped raises :class:`CheckpointError` naming the keys, and the architecture-defined buffers
(``relative_position_index``, ``attn_mask``) must equal ours exactly.

The returned :class:`OperaCT` is always in eval semantics (running statistics, no drop-path,
deterministic sliding windows): docs/defects.md #4 is exactly that the official extractor forgot it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from respiramfm.encoders.checkpoint import load_state_dict
from respiramfm.models.htsat import HTSAT
from respiramfm.models.htsat_layers import relative_position_index, shift_mask
from respiramfm.errors import CheckpointError, ConfigError

HTSAT_PREFIX = "encoder.encoder.htsat."
DROPPABLE_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.")
IGNORED_HEAD = re.compile(r"^(?:encoder\.)?(?:g|layer_norm|linear|middle)\.")
_SIZE_KEYS = {"embed_dim": "patch_embed.proj.weight", "depths": "the layers.<i>.blocks.<j>.* keys",
              "num_heads": "the layers.<i>.blocks.0.attn.relative_position_bias_table shapes"}
_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


def _listing(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def htsat_keys(state: Mapping[str, torch.Tensor], source: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Bare HTS-AT entries of a state dict (prefix stripped, COLA head ignored, front-end blocks dropped)."""
    if any(k.startswith(HTSAT_PREFIX) for k in state):
        stray = [k for k in state if not k.startswith(HTSAT_PREFIX) and not IGNORED_HEAD.match(k)]
        if stray:
            raise CheckpointError(f"unexpected keys outside {HTSAT_PREFIX!r}: {_listing(stray)}", source)
        state = {k[len(HTSAT_PREFIX):]: v for k, v in state.items() if k.startswith(HTSAT_PREFIX)}
    return {k: v for k, v in state.items() if not k.startswith(DROPPABLE_PREFIXES)}


def infer_sizes(state: Mapping[str, torch.Tensor], source=None) -> dict:
    """embed_dim, depths, num_heads (and the head/mel/patch sizes) from tensor shapes."""
    try:
        proj = state["patch_embed.proj.weight"]
        depth: dict[int, int] = {}
        for k in state:
            m = _BLOCK_KEY.match(k)
            if m:
                i, j = int(m.group(1)), int(m.group(2))
                depth[i] = max(depth.get(i, 0), j + 1)
        if not depth or sorted(depth) != list(range(len(depth))):
            raise KeyError("layers.<i>.blocks.<j>.*")
        heads = [int(state[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]) for i in sorted(depth)]
        return {"embed_dim": int(proj.shape[0]), "depths": tuple(depth[i] for i in sorted(depth)),
                "num_heads": tuple(heads), "patch_size": int(proj.shape[-1]),
                "mel_bins": int(state["bn0.weight"].shape[0]), "num_classes": int(state["head.weight"].shape[0])}
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"cannot infer HTS-AT sizes: missing {exc}", source) from None


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source=None) -> None:
    """Copy ``state`` into ``model`` after checking keys, shapes and architecture-defined buffers."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped: {_listing(shapes)}")
    if not problems:
        fixed = [k for k in expected if k.endswith(("relative_position_index", "attn_mask"))
                 and not torch.equal(state[k].to(expected[k].dtype), expected[k])]
        if fixed:
            problems.append(f"architecture buffers differ from HTS-AT's definition: {_listing(fixed)}")
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            problems.append(f"non-finite values in: {_listing(bad)}")
    if problems:
        raise CheckpointError("strict load failed; " + "; ".join(problems), source)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and raw bytes: the same for any file format or key prefix."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class OperaCT(nn.Module):
    """Frozen OPERA-CT: ``forward(spec (B, T, 64)) -> (B, out_dim)``; never leaves eval mode."""

    def __init__(self, htsat: HTSAT, weights_sha256: str):
        super().__init__()
        self.htsat = htsat
        self.embed_dim = htsat.embed_dim
        self.out_dim = htsat.num_features
        self.weights_sha256 = weights_sha256
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "OperaCT":
        return super().train(False)  # frozen feature extractor: eval semantics whatever the caller asks

    @property
    def device(self) -> torch.device:
        return self.htsat.bn0.weight.device

    def _run(self, fn, spec) -> torch.Tensor:
        spec = torch.as_tensor(spec).to(self.device)
        with torch.inference_mode():
            out = fn(spec)
        return out.clone()  # a normal (non-inference) tensor, usable downstream with autograd

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self._run(self.htsat, spec)

    def forward_tokens(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, 64, out_dim) final-norm token grid; see ``respiramfm.models.htsat`` for the token order."""
        return self._run(self.htsat.forward_tokens, spec)


def from_checkpoint(path: str | os.PathLike | Mapping[str, torch.Tensor], embed_dim: int | None = None,
                    depths: Sequence[int] | None = None, num_heads: Sequence[int] | None = None,
                    window_size: int = 8, device: str | torch.device = "cpu") -> OperaCT:
    """Build a frozen :class:`OperaCT` from a checkpoint file (or an in-memory state dict), strictly.

    Sizes not given are inferred from tensor shapes; given sizes that disagree with the file fail the
    strict load with the mis-shaped keys listed.
    """
    source = None if isinstance(path, Mapping) else Path(path)
    state = htsat_keys(path if isinstance(path, Mapping) else load_state_dict(path), source)
    sizes = infer_sizes(state, source)
    given = {"embed_dim": embed_dim, "depths": None if depths is None else tuple(int(d) for d in depths),
             "num_heads": None if num_heads is None else tuple(int(h) for h in num_heads)}
    conflicts = [f"{k}={v} given, but {_SIZE_KEYS[k]} imply {sizes[k]}"
                 for k, v in given.items() if v is not None and v != sizes[k]]
    if conflicts:
        raise CheckpointError("checkpoint does not fit the requested sizes: " + "; ".join(conflicts), source)
    try:
        model = HTSAT(window_size=window_size, drop_path_rate=0.0, **sizes)
    except ConfigError as exc:
        raise CheckpointError(f"tensor shapes describe no valid HTS-AT: {exc}", source) from None
    load_strict(model, state, source)
    model.eval()
    return OperaCT(model, weights_sha256(model.state_dict())).to(device)


# ------------------------------------------------------------------ fixture weight rule
def read_manifest(tsv_path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Parse a ``key<TAB>shape<TAB>dtype`` state-dict manifest (shape ``AxB`` or ``scalar``)."""
    out = {}
    path = Path(tsv_path)
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            key, shape, dtype = line.split("\t")
            dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
            out[key] = (dims, getattr(torch, dtype))
        except (ValueError, AttributeError):
            raise CheckpointError(f"malformed manifest line {n}: {line!r}", path) from None
    return out


def _defined_value(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Values the architecture defines for the keys the rule does not draw (extractor blocks: zeros)."""
    if key.endswith("relative_position_index"):
        return relative_position_index(int(round(shape[0] ** 0.5))).to(dtype)
    if key.endswith("attn_mask"):
        ws = int(round(shape[1] ** 0.5))
        grid = int(round(shape[0] ** 0.5)) * ws
        return shift_mask(grid, grid, ws, ws // 2).to(dtype)
    return torch.zeros(shape, dtype=dtype)


def seeded_state_dict(spec: str | os.PathLike | Mapping[str, torch.Tensor], seed: int,
                      prefix: str = HTSAT_PREFIX) -> dict[str, torch.Tensor]:
    """Weights by the fixture README's rule, from a TSV manifest or a reference state dict's shapes.

    Keys are visited in sorted order with one ``torch.Generator().manual_seed(seed)``; output keys carry
    ``prefix`` (use ``""`` for bare HTS-AT keys). Front-end blocks are zeros (they are dropped on load).
    """
    if isinstance(spec, Mapping):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in spec.items()}
    else:
        shapes = read_manifest(spec)
    bare = {k[len(HTSAT_PREFIX):] if k.startswith(HTSAT_PREFIX) else k: v for k, v in shapes.items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(bare):
        shape, dtype = bare[key]
        if (key.startswith(DROPPABLE_PREFIXES) or not dtype.is_floating_point
                or key.endswith(("relative_position_index", "attn_mask", "num_batches_tracked"))):
            value = _defined_value(key, shape, dtype)
        elif key.endswith("running_var"):
            value = 1 + torch.rand(shape, generator=g)
        elif key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "bn0.weight")):
            value = 1 + torch.randn(shape, generator=g) * 0.02
        else:
            value = torch.randn(shape, generator=g) * 0.02
        out[prefix + key] = value.to(dtype)
    return out
