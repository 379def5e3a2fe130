"""The one training-checkpoint format: safetensors for tensors, JSON for the rest, no pickle.

A checkpoint is a directory ``checkpoints/step_<N>/`` holding

* ``model.safetensors``: the tensors the trained task saves (its trainable weights or its
  whole state) and, with validation-based selection, the best weights under ``best::``;
* ``optimizer.safetensors`` + ``optimizer.json``: the optimiser's tensors, and its structure
  (param groups, scalar state) as JSON, so loading never unpickles anything;
* ``rng_rank<r>.safetensors``: each process's torch RNG state (``torch_cpu``, ``cuda_<i>``) and
  the task's own generators (``gen::<name>``);
* ``state.json``: step, epoch, schedule, selection state, world size and the fingerprints of
  the configuration and the data that a resumed run must match.

It is written into ``checkpoints/.tmp-step_<N>/`` and renamed into place, then
``checkpoints/latest.json`` is replaced atomically, so a process killed at any moment leaves
the previous checkpoint intact and ``latest.json`` always names a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from respiramfm.errors import CheckpointError
from respiramfm.utils.io import atomic_save_safetensors, atomic_write_json

TUPLE_KEYS = {"betas"}


def optimizer_to_safe(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into a tensor dict and a JSON-able structure."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict] = {}
    for pid, entry in sd["state"].items():
        out = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                name = f"state.{pid}.{k}"
                tensors[name] = v
                out[k] = {"tensor": name}
            else:
                out[k] = {"value": v}
        state[str(pid)] = out
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"state": state, "param_groups": groups}


def optimizer_from_safe(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    """Inverse of :func:`optimizer_to_safe`: a state dict for ``optimizer.load_state_dict``."""
    state = {}
    for pid, entry in structure["state"].items():
        st = {}
        for k, v in entry.items():
            if "tensor" in v:
                if v["tensor"] not in tensors:
                    raise CheckpointError(f"optimizer tensor {v['tensor']!r} missing")
                st[k] = tensors[v["tensor"]]
            else:
                st[k] = v["value"]
        state[int(pid)] = st
    groups = [{k: (tuple(v) if k in TUPLE_KEYS and isinstance(v, list) else v) for k, v in g.items()}
              for g in structure["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, initialised CUDA devices) and the given generators."""
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda_{i}"] = s
    for name, gen in (generators or {}).items():
        out[f"gen::{name}"] = gen.get_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor], generators: dict[str, torch.Generator] | None = None,
                  path=None) -> None:
    try:
        torch.set_rng_state(state["torch_cpu"])
        cuda = [state[k] for k in sorted(state) if k.startswith("cuda_")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        for name, gen in (generators or {}).items():
            gen.set_state(state[f"gen::{name}"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"RNG state missing or invalid ({exc})", path=path) from None


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def save_checkpoint(root: Path, step: int, model_state: dict, optimizer, meta: dict, accelerator=None,
                    keep: int = 2, generators: dict[str, torch.Generator] | None = None) -> Path:
    """Collective: every process calls it; the main process writes all but its own RNG file."""
    root = Path(root)
    rank = accelerator.process_index if accelerator is not None else 0
    main = rank == 0
    name = f"step_{step:09d}"
    tmp, final = root / f".tmp-{name}", root / name
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(accelerator)
    atomic_save_safetensors(tmp / f"rng_rank{rank}.safetensors", rng_state(generators))
    if main:
        atomic_save_safetensors(tmp / "model.safetensors", {k: v.detach().contiguous() for k, v in model_state.items()})
        opt_tensors, opt_struct = optimizer_to_safe(optimizer)
        atomic_save_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        atomic_write_json(tmp / "optimizer.json", opt_struct)
        atomic_write_json(tmp / "state.json", {**meta, "step": step})
    _barrier(accelerator)
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_json(root / "latest.json", {"step": step, "dir": name})
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier(accelerator)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The directory ``latest.json`` points at, or ``None`` when no checkpoint was completed."""
    pointer = Path(root) / "latest.json"
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["dir"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"unreadable checkpoint pointer ({exc})", path=pointer) from None
    path = Path(root) / name
    if not (path / "state.json").is_file():
        raise CheckpointError("checkpoint named by latest.json is incomplete", path=path)
    return path


def load_checkpoint(path: Path, rank: int) -> dict:
    """Tensors and metadata of one checkpoint directory (RNG of process ``rank``)."""
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        model = load_file(str(path / "model.safetensors"))
        opt = optimizer_from_safe(load_file(str(path / "optimizer.safetensors")),
                                  json.loads((path / "optimizer.json").read_text()))
        rng_file = path / f"rng_rank{rank}.safetensors"
        if not rng_file.is_file():
            raise CheckpointError(f"no RNG state for process {rank} "
                                  f"(saved by {meta.get('world_size')} processes)", path=path)
        rng = load_file(str(rng_file))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"cannot load checkpoint: {exc}", path=path) from None
    return {"meta": meta, "model": model, "optimizer": opt, "rng": rng}


__all__ = ["latest_checkpoint", "load_checkpoint", "optimizer_from_safe", "optimizer_to_safe", "rng_state",
           "save_checkpoint", "set_rng_state"]
