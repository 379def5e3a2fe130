"""The stage-2 model directory: one directory per trained model, loaded strictly or not at all.

Layout (docs/paper.md §8, "Save format")::

    DIR/config.json            what the model is: fusion config, backbone identity, LoRA, projector,
                               audio encoder + front end, task snapshot, label meaning, tensor manifest
    DIR/adapter/               PEFT ``save_pretrained`` (adapter_config.json, adapter_model.safetensors)
    DIR/head.safetensors       the hidden -> 2 head
    DIR/projector.safetensors  the frozen stage-1 projector (+ projector.json)

The base LLM is not copied: ``config.json`` records its name, revision and a
weights/tokenizer identity, and loading re-reads it with
:func:`~respiramfm.llm.backbones.load_backbone` and refuses a different one.

Loading treats the directory as untrusted input: every file must be a regular
file within a size limit (:mod:`respiramfm.models.files`), every section of
``config.json`` is checked for type and against the dataclass it describes
(:func:`read_config`), the base LLM is looked up in local files only unless the
caller allows a download, and every adapter, head and projector tensor is
checked against what the configuration implies *before* anything is loaded,
with all problems reported at once. Nothing is loaded with ``strict=False`` and nothing is unpickled. Saving
writes a hidden sibling directory and renames it into place, so a crash never
leaves a half-written model where a good one was.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

import torch

from respiramfm import __version__
from respiramfm.config import from_dict, to_dict
from respiramfm.data.tasks import task_from_dict
from respiramfm.errors import CheckpointError, ConfigError
from respiramfm.models.base import compare_shapes, read_description, safetensors_shapes
from respiramfm.models.configuration import FusionConfig
from respiramfm.models.files import check_regular_file, expect_type, read_json
from respiramfm.models.lora import adapter_state, check_adapter_dir, check_extra, lora_config
from respiramfm.models.projector import read_projector_json, save_projector
from respiramfm.utils.io import atomic_save_safetensors, atomic_write_json, sha256_file

FORMAT = "respiramfm.fusion"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
HEAD_NAME = "head.safetensors"
ADAPTER_DIR = "adapter"
LABELS = {"0": "absent", "1": "present"}
IDENTITY_KEYS = ("name", "revision", "arch", "weights", "tokenizer", "dtype")
REQUIRED = ("fusion", "backbone", "projector", "tasks", "files")
SECTION_TYPES = {"fusion": dict, "backbone": dict, "projector": dict, "tasks": dict, "files": dict, "lora": dict,
                 "encoder": dict, "frontend": dict, "tensors": dict, "labels": dict, "training": dict,
                 "thresholds": dict, "trained_on": dict}
THRESHOLD_RULES = ("youden", "sensitivity")  # evaluate/operating.py chooses; stage 2 records
NUM = (int, float)
THRESHOLD_KEYS = {"threshold": NUM, "rule": str, "target": (int, float, type(None)), "val_sensitivity": NUM,
                  "val_specificity": NUM, "n_val": int, "n_val_pos": int}
TRAINED_ON_KEYS = {"simulated": bool, "datasets": dict, "tasks_trained": list, "tasks_not_trained": list,
                   "val_source": str, "projector": dict}
DATASET_KEYS = {"simulated": bool, "train_records": int, "val_records": int, "train_patients": int,
                "val_patients": int}
MAX_FILES = 64
TASK_BOOLS = ("unseen_disease", "simulated")


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in sorted(state.items())}


def _hashed_files(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*.safetensors")):
        out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def build_config(model, extra: dict | None, files: dict[str, str]) -> dict:
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
        "thresholds": {str(k): dict(v) for k, v in sorted(getattr(model, "thresholds", {}).items())},
        "trained_on": dict(getattr(model, "trained_on", {})),
    }


def _task_dict(task) -> dict:
    d = dataclasses.asdict(task)
    d["positive"], d["negative"] = list(task.positive), list(task.negative)
    return d


def save_pretrained(model, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the model directory atomically; ``extra`` (JSON-able) lands under ``config["training"]``."""
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
        return read_json(directory / CONFIG_NAME).get("format") == FORMAT
    except CheckpointError:
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
    """``config.json`` of a model directory, checked as untrusted input: format, version and section types."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError("model directory not found" if not d.exists() else "model path is not a directory",
                              path=d)
    p = d / CONFIG_NAME
    if not os.path.lexists(p):
        raise CheckpointError(f"{CONFIG_NAME} is missing: not a respiramfm model directory", path=d)
    info = read_description(p, FORMAT, FORMAT_VERSION, REQUIRED)
    for key, kind in SECTION_TYPES.items():
        if key in info:
            expect_type(info[key], kind, f"{CONFIG_NAME}: {key!r}", p)
    expect_type(info["projector"].get("config"), dict, f"{CONFIG_NAME}: projector.config", p)
    expect_type(info["projector"].get("provenance", {}), dict, f"{CONFIG_NAME}: projector.provenance", p)
    for name, task in info["tasks"].items():
        _check_task(str(name)[:40], task, p)
    _check_file_list(info["files"], d, p)
    _check_thresholds(info.get("thresholds", {}), p)
    _check_trained_on(info.get("trained_on", {}), p)
    _check_tensor_manifest(info.get("tensors", {}), p)
    return info


def _check_task(name: str, task, p: Path) -> None:
    where = f"{CONFIG_NAME}: tasks.{name}"
    expect_type(task, dict, where, p)
    for key, value in task.items():
        if key in TASK_BOOLS:
            expect_type(value, bool, f"{where}.{key}", p)
        elif key in ("positive", "negative"):
            if not (isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise CheckpointError(f"{where}.{key} must be a list of diagnosis names", path=p)
        elif key == "extra":
            expect_type(value, dict, f"{where}.extra", p)
        else:
            expect_type(value, str, f"{where}.{str(key)[:40]}", p)


def _check_keys(value: dict, schema: dict, where: str, p: Path) -> None:
    for key, item in value.items():
        if key not in schema:
            raise CheckpointError(f"{where}: unknown key {str(key)[:40]!r}", path=p)
        expect_type(item, schema[key], f"{where}.{key}", p)


def _check_thresholds(thresholds: dict, p: Path) -> None:
    """Each task's decision threshold: a probability in [0, 1] and the rule that chose it."""
    for name, t in thresholds.items():
        where = f"{CONFIG_NAME}: thresholds.{str(name)[:40]}"
        expect_type(t, dict, where, p)
        _check_keys(t, THRESHOLD_KEYS, where, p)
        if "threshold" not in t or not 0.0 <= float(t["threshold"]) <= 1.0:
            raise CheckpointError(f"{where}.threshold must be a probability in [0, 1]", path=p)
        if t.get("rule") not in THRESHOLD_RULES:
            raise CheckpointError(f"{where}.rule must be one of {THRESHOLD_RULES}", path=p)


def _check_trained_on(trained_on: dict, p: Path) -> None:
    """What the model was trained on: known keys of known types (datasets -> counts and the simulated flag)."""
    where = f"{CONFIG_NAME}: trained_on"
    _check_keys(trained_on, TRAINED_ON_KEYS, where, p)
    for name, ds in trained_on.get("datasets", {}).items():
        expect_type(ds, dict, f"{where}.datasets.{str(name)[:40]}", p)
        _check_keys(ds, DATASET_KEYS, f"{where}.datasets.{str(name)[:40]}", p)
    for key in ("tasks_trained", "tasks_not_trained"):
        if not all(isinstance(t, str) for t in trained_on.get(key, [])):
            raise CheckpointError(f"{where}.{key} must be a list of task names", path=p)


def _check_file_list(files: dict, d: Path, p: Path) -> None:
    if len(files) > MAX_FILES:
        raise CheckpointError(f"{CONFIG_NAME}: 'files' lists {len(files)} entries (limit {MAX_FILES})", path=p)
    for name, digest in files.items():
        parts = PurePosixPath(name).parts
        if (not name or PurePosixPath(name).is_absolute() or ".." in parts or not name.endswith(".safetensors")
                or not isinstance(digest, str) or len(digest) != 64):
            raise CheckpointError(f"{CONFIG_NAME}: 'files' entry {name[:80]!r} is not a safetensors file "
                                  "inside the model directory with a sha256", path=p)


def _check_tensor_manifest(tensors: dict, p: Path) -> None:
    for part, shapes in tensors.items():
        expect_type(shapes, dict, f"{CONFIG_NAME}: tensors.{str(part)[:40]}", p)
        for key, shape in shapes.items():
            if not (isinstance(shape, list) and len(shape) <= 8
                    and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2 ** 40 for n in shape)):
                raise CheckpointError(f"{CONFIG_NAME}: tensors.{part}.{str(key)[:80]} is not a shape", path=p)


def parse_config(directory: str | os.PathLike, info: dict) -> tuple[FusionConfig, dict]:
    """The checked :class:`FusionConfig` and task snapshot of a read ``config.json``."""
    p = Path(directory) / CONFIG_NAME
    try:
        cfg = from_dict(FusionConfig, info["fusion"], where=f"{p}:fusion").validate()
        check_extra(cfg.lora)
        tasks = {str(name): task_from_dict(t) for name, t in info["tasks"].items()}
    except (ConfigError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"bad model config: {exc}", path=p) from None
    encoder = info.get("encoder")
    if encoder is not None and encoder != to_dict(cfg.encoder):
        raise CheckpointError("the 'encoder' section disagrees with fusion.encoder", path=p)
    frontend = info.get("frontend")
    if frontend is not None and frontend != dict(cfg.encoder.frontend):
        raise CheckpointError("the 'frontend' section disagrees with fusion.encoder.frontend", path=p)
    return cfg, tasks


def check_backbone(info: dict, backbone, directory: str | os.PathLike) -> None:
    """Refuse a base LLM whose identity differs from the one recorded at save time."""
    ident = backbone.identity()
    mismatch = [f"{k}: saved {info['backbone'].get(k)!r}, loaded {ident.get(k)!r}"
                for k in IDENTITY_KEYS if str(info["backbone"].get(k, "")) != str(ident.get(k, ""))]
    if mismatch:
        raise CheckpointError("the base LLM differs from the one this model was trained on: " + "; ".join(mismatch),
                              path=Path(directory) / CONFIG_NAME)


def check_model_files(directory: str | os.PathLike, info: dict, model) -> list[str]:
    """Every disagreement between the directory's files, its config and ``model`` ([] when none)."""
    d = Path(directory)
    cfg = model.cfg
    problems: list[str] = []
    if read_projector_json(d)["config"] != info["projector"]["config"]:
        problems.append("projector.json and config.json describe different projectors")
    if cfg.lora.enabled:
        problems += check_adapter_dir(d / ADAPTER_DIR, model.llm, model.backbone.arch, cfg.lora)
    elif os.path.lexists(d / ADAPTER_DIR):
        problems.append(f"{ADAPTER_DIR}/ exists but the config says LoRA is disabled")
    want_head = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
    problems += compare_shapes("head", want_head, safetensors_shapes(d / HEAD_NAME))
    expected = {"head": want_head, "projector": {k: tuple(v.shape) for k, v in model.projector.state_dict().items()}}
    if cfg.lora.enabled:
        expected["adapter"] = {k: tuple(v.shape) for k, v in adapter_state(model.llm).items()}
    manifest = info.get("tensors", {})
    for part in sorted(set(manifest) | set(expected)):
        found = {k: tuple(v) for k, v in manifest.get(part, {}).items()}
        problems += [f"config.json tensors: {line}" for line in compare_shapes(part, expected.get(part, {}), found)]
    if not problems:
        for name, digest in sorted(info["files"].items()):
            path = check_regular_file(d / name, name)
            if sha256_file(path) != digest:
                problems.append(f"{name}: content differs from the sha256 recorded at save time")
    return problems


__all__ = ["ADAPTER_DIR", "CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "HEAD_NAME", "build_config", "check_backbone",
           "check_model_files", "parse_config", "read_config", "save_pretrained"]
