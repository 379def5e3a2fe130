"""The saved-model base class: one on-disk format for every model in :mod:`respiramfm.models`.

A saved model is a JSON description (``format``, ``version``, the model's config dataclass as
a mapping, provenance) next to safetensors weights. Subclasses name their files and format
(``FORMAT``, ``FORMAT_VERSION``, ``CONFIG_NAME``) and implement ``save_pretrained`` /
``from_pretrained``; this class gives them the shared, strict pieces:

* :meth:`SavedModel.read_description` — the JSON file read as untrusted input
  (:mod:`respiramfm.models.files`) and checked for format and version;
* :func:`safetensors_shapes` — tensor names and shapes from the header only, before any data;
* :func:`load_safetensors` — weights loaded only from a regular file, with every tensor finite;
* :func:`compare_shapes` / :func:`check_state` — missing, unexpected and mis-shaped tensors,
  reported all at once. Nothing is ever loaded with ``strict=False`` and nothing is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from respiramfm.errors import CheckpointError
from respiramfm.models.files import MAX_TENSOR_BYTES, check_regular_file, read_json


def safetensors_shapes(path: str | os.PathLike, what: str | None = None) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` from a safetensors header (no tensor data read); CheckpointError if unusable."""
    p = check_regular_file(path, what or Path(path).name, MAX_TENSOR_BYTES)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{what or p.name} is unreadable ({exc})", path=p) from None


def load_safetensors(path: str | os.PathLike, what: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (a regular file within the size limit), every float finite."""
    p = check_regular_file(path, what or Path(path).name, MAX_TENSOR_BYTES)
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{what or p.name} is unreadable ({exc})", path=p) from None
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise CheckpointError(f"non-finite values in {bad}", path=p)
    return state


def compare_shapes(what: str, expected: dict[str, tuple], found: dict[str, tuple]) -> list[str]:
    """Every missing, unexpected or mis-shaped tensor, as readable lines ([] when they agree)."""
    out = [f"{what}: missing tensor {k}" for k in sorted(set(expected) - set(found))]
    out += [f"{what}: unexpected tensor {k}" for k in sorted(set(found) - set(expected))]
    out += [f"{what}: {k} has shape {found[k]}, expected {expected[k]}"
            for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
    return out


def check_state(state: dict[str, torch.Tensor], model: nn.Module, path: str | os.PathLike, what: str) -> None:
    """Raise CheckpointError unless ``state`` fits ``model`` key for key and shape for shape, all finite."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = compare_shapes(what, expected, {k: tuple(v.shape) for k, v in state.items()})
    problems += [f"{what}: {k}: non-finite values" for k, v in sorted(state.items())
                 if v.is_floating_point() and not torch.isfinite(v).all()]
    if problems:
        raise CheckpointError("; ".join(problems), path=path)


def read_description(path: str | os.PathLike, fmt: str, version: int, required: tuple[str, ...] = ()) -> dict:
    """A saved model's JSON description (untrusted input: :func:`~respiramfm.models.files.read_json`),
    checked for its ``format``, ``version`` and ``required`` sections."""
    p = Path(path)
    info = read_json(p, p.name)
    if info.get("format") != fmt:
        raise CheckpointError(f"not a {fmt} file (format {str(info.get('format'))[:80]!r})", path=p)
    if info.get("version") != version:
        raise CheckpointError(f"unsupported model format version {str(info.get('version'))[:80]!r}", path=p)
    missing = [k for k in required if k not in info]
    if missing:
        raise CheckpointError(f"{p.name} lacks the section(s) {missing}", path=p)
    return info


class SavedModel(nn.Module):
    """Base of the models that have a saved form (projector, fusion classifier)."""

    FORMAT: ClassVar[str] = ""
    FORMAT_VERSION: ClassVar[int] = 1
    CONFIG_NAME: ClassVar[str] = "config.json"

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        **kwargs: Any):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def read_description(cls, directory: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
        """The model's JSON description, checked as untrusted input and for format and version."""
        return read_description(Path(directory) / cls.CONFIG_NAME, cls.FORMAT, cls.FORMAT_VERSION, required)


__all__ = ["SavedModel", "check_state", "compare_shapes", "load_safetensors", "read_description",
           "safetensors_shapes"]
