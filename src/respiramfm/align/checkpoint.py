"""Resumable stage-1 training state in ONE safetensors file (no pickle anywhere).

A checkpoint holds everything that decides the rest of the run — current and best
projector weights, the loss's learnable ``logit_scale``, every optimiser tensor, the
torch RNG state (dropout) and the shuffle generator's state — plus a JSON document in
the safetensors metadata with the epoch counter, selection state, optimiser
hyper-parameters, a config digest and a data fingerprint. One file written atomically
means a SIGKILL leaves either the previous checkpoint or the new one, never a mix, and a
resumed run continues bit-for-bit where the killed one stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from respiramfm.errors import CheckpointError
from respiramfm.utils.io import atomic_save_safetensors

FORMAT = "respiramfm.align-checkpoint"
FORMAT_VERSION = 1


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimiser state as named tensors plus a JSON-able remainder (param groups, scalar state)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, object] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = v
    for name, v in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, best_state: dict[str, torch.Tensor],
                    loss_fn: torch.nn.Module, opt: torch.optim.Optimizer, shuffle_gen: torch.Generator,
                    state: dict) -> None:
    """Write the training state atomically; ``state`` is the JSON part (epoch, best, digests...)."""
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
    tensors.update({f"best.{k}": v.clone() for k, v in best_state.items()})
    tensors.update({f"loss.{k}": v for k, v in loss_fn.state_dict().items()})
    opt_tensors, opt_meta = flatten_optimizer(opt)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.shuffle"] = shuffle_gen.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    doc = dict(state, optimizer=opt_meta)
    atomic_save_safetensors(path, tensors, metadata={"format": FORMAT, "version": str(FORMAT_VERSION),
                                                     "state": json.dumps(doc, sort_keys=True)})


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensors grouped by prefix: model/best/loss/optim/rng, the JSON state document)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            flat = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"unreadable checkpoint ({exc})", path=path) from None
    if meta.get("format") != FORMAT or meta.get("version") != str(FORMAT_VERSION):
        raise CheckpointError(f"not a {FORMAT} v{FORMAT_VERSION} file", path=path)
    try:
        doc = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint state document is missing or invalid ({exc})", path=path) from None
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "best": {}, "loss": {}, "optim": {}, "rng": {}}
    for k, v in flat.items():
        prefix, _, rest = k.partition(".")
        if prefix not in groups:
            raise CheckpointError(f"unexpected tensor {k!r}", path=path)
        groups[prefix][rest if prefix != "optim" else k] = v
    return groups, doc


def restore(path: str | os.PathLike, groups: dict, doc: dict, *, model: torch.nn.Module, loss_fn: torch.nn.Module,
            opt: torch.optim.Optimizer, shuffle_gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Load the grouped tensors into live objects (strictly); returns the best projector state."""
    for name, module, part in (("model", model, groups["model"]), ("loss", loss_fn, groups["loss"])):
        expected = module.state_dict()
        if set(part) != set(expected) or any(part[k].shape != expected[k].shape for k in part):
            raise CheckpointError(f"{name} tensors do not match the configured model "
                                  f"(have {sorted(part)}, expected {sorted(expected)})", path=path)
        module.load_state_dict(part, strict=True)
    if set(groups["best"]) != set(model.state_dict()):
        raise CheckpointError("best-projector tensors do not match the configured model", path=path)
    try:
        opt.load_state_dict(unflatten_optimizer(groups["optim"], doc["optimizer"]))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"optimizer state does not fit ({exc})", path=path) from None
    rng = groups["rng"]
    try:
        torch.set_rng_state(rng["torch"])
        shuffle_gen.set_state(rng["shuffle"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"RNG state missing or invalid ({exc})", path=path) from None
    return {k: v.clone() for k, v in groups["best"].items()}
