"""Stage-1 projector ``f_θ: R^768 → R^d`` mapping a frozen audio embedding into an LLM's space.

The official RespiraMFM projector (docs/paper.md §4) is

    Linear(768→1024) → LayerNorm → ReLU → Dropout(0.1) → Linear(1024→d) → LayerNorm → ReLU

Its final ReLU makes every output coordinate non-negative while the LLM states it
is aligned to are signed, so after L2 normalisation the projected audio can only
reach the positive orthant of the text sphere. ``final`` therefore chooses the
output head:

* ``"official"``  — LayerNorm + ReLU, exactly as released;
* ``"layernorm"`` — LayerNorm only (signed outputs, same parameter count);
* ``"none"``      — the bare last Linear.

``kind="linear"`` is a single ``Linear(in→d)`` (RespLLM's projector) followed by the
same optional head. Modules live in ``self.projector`` (an ``nn.Sequential``) with the
official layer order, so an official ``state_dict`` loads strictly
(:func:`projector_from_official_state_dict`).

Saved form: a directory holding ``projector.safetensors`` (weights, with the config
also in the safetensors metadata) and ``projector.json`` (config + provenance).
Loading is strict: missing, unexpected, mis-shaped or non-finite tensors raise
:class:`~respiramfm.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from safetensors import SafetensorError
from safetensors.torch import safe_open

from respiramfm.config import from_dict, to_dict
from respiramfm.errors import CheckpointError, ConfigError
from respiramfm.models.base import SavedModel, check_state, compare_shapes
from respiramfm.models.configuration import ProjectorConfig
from respiramfm.models.files import MAX_TENSOR_BYTES, check_regular_file, expect_type
from respiramfm.utils.io import atomic_save_safetensors, atomic_write_json

WEIGHTS_NAME = "projector.safetensors"
CONFIG_NAME = "projector.json"
FORMAT = "respiramfm.projector"
FORMAT_VERSION = 1


class Projector(SavedModel):
    """The stage-1 aligner; ``forward`` returns unnormalised outputs (losses normalise)."""

    FORMAT = FORMAT
    FORMAT_VERSION = FORMAT_VERSION
    CONFIG_NAME = CONFIG_NAME

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        cfg.validate()
        if cfg.out_dim is None:
            raise ConfigError("projector.out_dim is unset; it must equal the text target dimension")
        if cfg.in_dim is None:
            raise ConfigError("projector.in_dim is unset; it must equal the audio embedding dimension")
        self.cfg = cfg
        if cfg.kind == "mlp":
            layers: list[nn.Module] = [
                nn.Linear(cfg.in_dim, cfg.hidden),
                nn.LayerNorm(cfg.hidden),
                nn.ReLU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.hidden, cfg.out_dim),
            ]
        else:
            layers = [nn.Linear(cfg.in_dim, cfg.out_dim)]
        if cfg.final in ("official", "layernorm"):
            layers.append(nn.LayerNorm(cfg.out_dim))
        if cfg.final == "official":
            layers.append(nn.ReLU())
        self.projector = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | os.PathLike, provenance: dict | None = None) -> Path:
        return save_projector(self, directory, provenance=provenance)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "Projector":
        return load_projector(directory, device=device)[0]


def build_projector(cfg: ProjectorConfig) -> Projector:
    """A freshly initialised projector (torch's default init, driven by the global RNG)."""
    return Projector(cfg)


def save_projector(model: Projector, out_dir: str | os.PathLike, provenance: dict | None = None) -> Path:
    """Write ``projector.safetensors`` and ``projector.json`` into ``out_dir`` (each atomically)."""
    out_dir = Path(out_dir)
    cfg = to_dict(model.cfg)
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "config": json.dumps(cfg, sort_keys=True)}
    atomic_save_safetensors(out_dir / WEIGHTS_NAME, model.state_dict(), metadata=meta)
    atomic_write_json(out_dir / CONFIG_NAME, {
        "format": FORMAT, "version": FORMAT_VERSION, "config": cfg, "provenance": provenance or {},
    })
    return out_dir


def read_projector_json(path: str | os.PathLike) -> dict:
    """The ``projector.json`` next to the weights (``path``: the directory or either file), checked."""
    p = _projector_dir(path) / CONFIG_NAME
    info = Projector.read_description(p.parent, required=("config",))
    expect_type(info["config"], dict, "projector.json: config", p)
    expect_type(info.get("provenance", {}), dict, "projector.json: provenance", p)
    return info


def _projector_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.parent if p.suffix in (".safetensors", ".json") else p


def load_projector(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Projector, ProjectorConfig]:
    """Strictly load a saved projector; returns ``(model in eval mode, config)``."""
    d = _projector_dir(path)
    info = read_projector_json(d)
    try:
        cfg = from_dict(ProjectorConfig, info["config"], where=str(d / CONFIG_NAME)).validate()
    except ConfigError as exc:
        raise CheckpointError(f"bad projector config: {exc}", path=d / CONFIG_NAME) from None
    if cfg.out_dim is None:
        raise CheckpointError("projector config has no out_dim", path=d / CONFIG_NAME)
    weights = d / WEIGHTS_NAME
    size = check_regular_file(weights, "projector weights", MAX_TENSOR_BYTES).stat().st_size
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            try:
                same = meta.get("config") is None or json.loads(meta["config"]) == info["config"]
            except ValueError:
                same = False
            if not same:
                raise CheckpointError(f"weights were saved with a different config than {CONFIG_NAME}",
                                      path=weights)
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            if 2 * parameter_count(cfg) > size:  # at 2+ bytes a value, the file cannot hold these weights:
                raise CheckpointError(f"projector weights ({size} bytes) are far too small for the config in "
                                      f"{CONFIG_NAME} ({parameter_count(cfg)} parameters)", path=weights)
            model = Projector(cfg)  # allocation bounded by the file's real size (checked just above)
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            problems = compare_shapes("projector", expected, shapes)
            if problems:  # refuse before reading any tensor data
                raise CheckpointError("projector weights do not match its config: " + "; ".join(problems),
                                      path=weights)
            state = {k: fh.get_tensor(k) for k in shapes}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable safetensors file ({exc})", path=weights) from None
    check_state(state, model, weights, "projector")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg


def projector_from_official_state_dict(path: str | os.PathLike,
                                       dropout: float = 0.1) -> tuple[Projector, ProjectorConfig]:
    """Load a projector saved by the official code (``torch.save(model.state_dict())``).

    Read with ``weights_only=True`` (no pickle execution); dimensions are inferred
    from the tensor shapes and the result must match our layout key for key.
    """
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError("file not found", path=path) from None
    except Exception as exc:  # torch raises several unrelated types for corrupt/unsafe files
        raise CheckpointError(f"cannot read as a weights-only torch file ({type(exc).__name__}: {exc})",
                              path=path) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("not a flat state_dict of tensors", path=path)
    try:
        w0, w4 = state["projector.0.weight"], state["projector.4.weight"]
    except KeyError:
        raise CheckpointError("no projector.0/projector.4 Linear weights: not an official MLP projector",
                              path=path) from None
    final = "official" if "projector.5.weight" in state else "none"
    cfg = ProjectorConfig(kind="mlp", in_dim=w0.shape[1], hidden=w0.shape[0], out_dim=w4.shape[0], dropout=dropout,
                          final=final)
    model = Projector(cfg)
    check_state(state, model, os.fspath(path), "projector")
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg


def parameter_count(cfg: ProjectorConfig) -> int:
    """Parameters of a projector built from ``cfg`` (computed, nothing allocated)."""
    out = int(cfg.out_dim or 0)
    first = cfg.hidden if cfg.kind == "mlp" else out
    n = (cfg.in_dim + 1) * first
    if cfg.kind == "mlp":
        n += 2 * cfg.hidden + (cfg.hidden + 1) * out
    return n + (2 * out if cfg.final in ("official", "layernorm") else 0)


def official_parameter_count(in_dim: int = 768, hidden: int = 1024, out_dim: int = 2560) -> int:
    """Parameters of the official MLP (2 Linear + 2 LayerNorm): 3,418,624 for 768→1024→2560."""
    return (in_dim + 1) * hidden + 2 * hidden + (hidden + 1) * out_dim + 2 * out_dim


__all__ = [
    "Projector", "build_projector", "load_projector", "official_parameter_count", "parameter_count",
    "projector_from_official_state_dict", "read_projector_json", "save_projector",
]
