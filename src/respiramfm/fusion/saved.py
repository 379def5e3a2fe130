"""One directory per trained stage-2 model, loaded strictly or not at all.

Layout (REFERENCE §8, "Save format")::

    DIR/config.json            what the model is: fusion config, backbone identity, LoRA, projector,
                               audio encoder + front end, task snapshot, label meaning, tensor manifest
    DIR/adapter/               PEFT ``save_pretrained`` (adapter_config.json, adapter_model.safetensors)
    DIR/head.safetensors       the hidden -> 2 head
    DIR/projector.safetensors  the frozen stage-1 projector (+ projector.json)

The base LLM is not copied: ``config.json`` records its name, revision and a
weights/tokenizer identity, and loading re-reads it with
:func:`~respiramfm.llm.backbones.load_backbone` and refuses a different one.

Loading checks every adapter, head and projector tensor against what the
configuration implies *before* anything is loaded, and reports all problems at
once. Nothing is loaded with ``strict=False`` and nothing is unpickled. Saving
writes a hidden sibling directory and renames it into place, so a crash never
leaves a half-written model where a good one was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from respiramfm import __version__
from respiramfm.config import from_dict, to_dict
from respiramfm.errors import CheckpointError, ConfigError
from respiramfm.utils.io import atomic_save_safetensors, atomic_write_json, sha256_file

FORMAT = "respiramfm.fusion"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
HEAD_NAME = "head.safetensors"
ADAPTER_DIR = "adapter"
LABELS = {"0": "absent", "1": "present"}
IDENTITY_KEYS = ("name", "revision", "arch", "weights", "tokenizer", "dtype")


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sorted(state.items())}


def _hashed_files(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*.safetensors")):
        out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def build_config(model, extra: dict | None, files: dict[str, str]) -> dict:
    from respiramfm.fusion.lora import adapter_state, lora_config

    cfg = model.cfg
    lora = {"enabled": cfg.lora.enabled, "settings": to_dict(cfg.lora)}
    if cfg.lora.enabled:
        lc = lora_config(cfg.lora, model.backbone.arch)
        lora.update(target_modules=sorted(lc.target_modules), injected_modules=model.lora_modules())
    tensors = {"head": _shapes(model.head.state_dict()), "projector": _shapes(model.projector.state_dict())}
    if cfg.lora.enabled:
        tensors["adapter"] = _shapes(adapter_state(model.llm))
    bb = model.backbone
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "package_version": __version__,
        "fusion": to_dict(cfg),
        "backbone": {**model.base_identity, "hidden_size": bb.hidden_size, "num_layers": bb.num_layers,
                     "n_params": bb.n_params, "source": bb.source},
        "lora": lora,
        "projector": {"config": to_dict(model.projector.cfg), "provenance": model.projector_provenance,
                      "frozen": True},
        "encoder": to_dict(cfg.encoder),
        "frontend": dict(cfg.encoder.frontend),
        "tasks": {name: _task_dict(t) for name, t in sorted(model.tasks.items())},
        "labels": dict(LABELS),
        "probability": "softmax(logits)[:, 1] = P(label 1 = condition present)",
        "tensors": tensors,
        "files": files,
        "training": dict(extra or {}),
    }


def _task_dict(task) -> dict:
    d = dataclasses.asdict(task)
    d["positive"], d["negative"] = list(task.positive), list(task.negative)
    return d


def save_pretrained(model, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the model directory atomically; ``extra`` (JSON-able) lands under ``config["training"]``."""
    from respiramfm.align.projector import save_projector

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _check_replaceable(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        if model.cfg.lora.enabled:
            model.llm.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True)
            (tmp / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
        atomic_save_safetensors(tmp / HEAD_NAME, model.head.state_dict(), metadata={"format": FORMAT})
        save_projector(model.projector, tmp, provenance=model.projector_provenance)
        atomic_write_json(tmp / CONFIG_NAME, build_config(model, extra, _hashed_files(tmp)))
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _check_replaceable(directory: Path) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ConfigError("output exists and is not a directory", path=directory)
    if any(directory.iterdir()) and not _is_model_dir(directory):
        raise ConfigError("output directory exists, is not empty and is not a respiramfm model; "
                          "refusing to replace it", path=directory)


def _is_model_dir(directory: Path) -> bool:
    try:
        return json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _swap_in(tmp: Path, directory: Path) -> None:
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.rmdir(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_config(directory: str | os.PathLike) -> dict:
    """``config.json`` of a model directory, checked for format and version."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError("model directory not found", path=d)
    p = d / CONFIG_NAME
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{CONFIG_NAME} is missing: not a respiramfm model directory", path=d) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{CONFIG_NAME} is not valid JSON ({exc})", path=p) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"not a {FORMAT} model config", path=p)
    if info.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"unsupported model format version {info.get('version')!r}", path=p)
    for key in ("fusion", "backbone", "projector", "tasks", "files"):
        if key not in info:
            raise CheckpointError(f"{CONFIG_NAME} lacks the {key!r} section", path=p)
    return info


def _tensor_shapes(path: Path) -> dict[str, tuple] | str:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (SafetensorError, OSError) as exc:
        return f"{path.name} is unreadable ({exc})"


def load_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild a saved :class:`RespiraMFM` strictly; raises CheckpointError listing every problem."""
    from respiramfm.align.projector import load_projector
    from respiramfm.data.tasks import task_from_dict
    from respiramfm.fusion.lora import compare_shapes, check_adapter_dir, load_adapter_strict
    from respiramfm.fusion.model import FusionConfig, RespiraMFM, load_configured_backbone

    d = Path(directory)
    info = read_config(d)
    try:
        cfg = from_dict(FusionConfig, info["fusion"], where=f"{d / CONFIG_NAME}:fusion").validate()
        tasks = {name: task_from_dict(t) for name, t in info["tasks"].items()}
    except ConfigError as exc:
        raise CheckpointError(f"bad model config: {exc}", path=d / CONFIG_NAME) from None
    projector, _ = load_projector(d)  # strict on its own (missing/unexpected/shape/non-finite)
    backbone = load_configured_backbone(cfg, device=device)
    ident = backbone.identity()
    mismatch = [f"{k}: saved {info['backbone'].get(k)!r}, loaded {ident.get(k)!r}"
                for k in IDENTITY_KEYS if str(info["backbone"].get(k, "")) != str(ident.get(k, ""))]
    if mismatch:
        raise CheckpointError("the base LLM differs from the one this model was trained on: " + "; ".join(mismatch),
                              path=d / CONFIG_NAME)
    model = RespiraMFM(cfg, projector, backbone, projector_provenance=info["projector"].get("provenance"),
                       tasks=tasks)
    problems: list[str] = []
    if cfg.lora.enabled:
        problems += check_adapter_dir(d / ADAPTER_DIR, model.llm, backbone.arch, cfg.lora)
    elif (d / ADAPTER_DIR).exists():
        problems.append(f"{ADAPTER_DIR}/ exists but the config says LoRA is disabled")
    head_shapes = _tensor_shapes(d / HEAD_NAME)
    if isinstance(head_shapes, str):
        problems.append(head_shapes)
    else:
        want = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
        problems += compare_shapes("head", want, head_shapes)
    if not problems:
        problems += [f"{name}: content differs from the sha256 recorded at save time"
                     for name, digest in sorted(info["files"].items())
                     if not (d / name).is_file() or sha256_file(d / name) != digest]
    if problems:
        raise CheckpointError("model directory does not match its config:\n  - " + "\n  - ".join(problems), path=d)
    if cfg.lora.enabled:
        load_adapter_strict(d / ADAPTER_DIR, model.llm)
    from safetensors.torch import load_file

    head_state = load_file(str(d / HEAD_NAME))
    if not all(torch.isfinite(v).all() for v in head_state.values()):
        raise CheckpointError("non-finite head weights", path=d / HEAD_NAME)
    model.head.load_state_dict(head_state, strict=True)
    model.saved_config = info
    return model.to(device).eval()
