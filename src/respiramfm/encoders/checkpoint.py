"""Load a state dict from a checkpoint file without ever running code from it.

Order of attempts:

1. ``.safetensors``: safetensors (no code path at all).
2. ``.ckpt``/``.pt``/``.pth``/``.bin``: ``torch.load(weights_only=True)``.
3. Only if torch's weights-only unpickler rejects the file (a PyTorch Lightning checkpoint carrying
   hyper-parameter objects such as ``argparse.Namespace`` or Lightning's ``AttributeDict``): our own
   restricted unpickler over the zip archive. It materialises tensors (from the archive's raw storage
   records, via ``torch.frombuffer``) and plain containers only. Every other global is replaced by an
   inert ``OpaqueObject`` placeholder that records its name and arguments and never imports or calls the
   real thing; globals that can only serve to execute code or touch the system (``os.system``,
   ``builtins.exec``, ``subprocess``...) make the whole file rejected with :class:`CheckpointError`.

The Lightning wrapper is unwrapped: the returned mapping is ``obj["state_dict"]`` when present, else the
object itself, and every value must be a tensor.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from respiramfm.errors import CheckpointError

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Modules whose globals have no business in a weights file: referencing any of them rejects the file.
_DENIED_MODULES = {
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "pty", "shutil", "socket",
    "ctypes", "_ctypes", "marshal", "runpy", "importlib", "code", "codeop", "pickle", "_pickle", "dill",
    "cloudpickle", "webbrowser", "multiprocessing", "sys", "signal", "pdb", "bdb", "timeit", "platform",
    "tempfile", "asyncio", "threading", "_thread", "urllib", "http", "ftplib", "smtplib", "telnetlib",
    "requests", "io", "_io", "glob", "operator", "_operator", "inspect", "gc", "sysconfig", "zipimport",
}
_DENIED_NAMES = {
    "types.FunctionType", "types.CodeType", "types.MethodType", "types.LambdaType", "functools.reduce",
    "torch.load", "torch.save", "torch.from_file", "numpy.load", "numpy.loadtxt", "numpy.fromfile",
    "numpy.save", "numpy.savetxt", "numpy.testing._private.utils.runstring",
}
_DENIED_PACKAGES = ("torch.hub", "torch.jit", "torch.ops", "torch._C", "torch.classes", "numpy.ctypeslib",
                    "numpy.distutils", "setuptools", "distutils", "pip")
_SAFE_BUILTINS = {"set", "frozenset", "complex", "slice", "range", "bytearray", "bytes", "list", "dict",
                  "tuple", "int", "float", "bool", "str", "object"}
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}


class OpaqueObject:
    """Inert stand-in for an object whose class the restricted loader refuses to import."""

    origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<opaque {self.origin}>"


class _Storage:
    """A storage record of the archive, as a flat tensor of its dtype."""

    def __init__(self, data: torch.Tensor):
        self.data = data


def _view(storage: Any, offset: int, size: Any, stride: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor rebuilt from a non-storage object {storage!r}")
    flat = storage.data if dtype is None or dtype == storage.data.dtype else storage.data.view(dtype)
    try:
        return flat.as_strided(tuple(size), tuple(stride), int(offset))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"malformed tensor record: {exc}") from None


def _rebuild_tensor_v2(storage, offset, size, stride, *_ignored):
    return _view(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, _requires_grad, _hooks, dtype, *_ignored):
    return _view(storage, offset, size, stride, dtype if isinstance(dtype, torch.dtype) else None)


def _rebuild_parameter(data, *_ignored):
    return data if isinstance(data, torch.Tensor) else OpaqueObject(data)


def _rebuild_from_type_v2(func, _new_type, args, _state):
    return func(*args) if func in _REBUILDERS.values() else OpaqueObject(func, args)


def _reconstructor(cls, _base, state):
    return cls(state) if isinstance(cls, type) and issubclass(cls, OpaqueObject) else OpaqueObject(cls, state)


_REBUILDERS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "copyreg._reconstructor": _reconstructor,
}


def _denied(module: str, name: str) -> bool:
    root = module.split(".")[0]
    full = f"{module}.{name}"
    if root in _DENIED_MODULES or full in _DENIED_NAMES:
        return True
    if any(full == p or full.startswith(p + ".") or module == p for p in _DENIED_PACKAGES):
        return True
    return root == "builtins" and name not in _SAFE_BUILTINS


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, archive: zipfile.ZipFile, root: str, path: Path):
        super().__init__(fh)
        self._archive, self._root, self._path = archive, root, path
        self._storages: dict[str, _Storage] = {}
        self._opaque: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # torch.save writes protocol 2, whose Python-2 names (__builtin__, copy_reg...) map as pickle would.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in _REBUILDERS:
            return _REBUILDERS[full]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if module == "_codecs" and name == "encode":  # protocol-2 encoding of bytes objects
            return lambda text, encoding="latin1": str(text).encode(encoding)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name == "Size":
            return torch.Size
        if _denied(module, name):
            raise CheckpointError(f"refusing to load: the pickle references {full}, which can run code",
                                  self._path)
        if full not in self._opaque:
            self._opaque[full] = type(f"Opaque[{full}]", (OpaqueObject,), {"origin": full})
        return self._opaque[full]

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise CheckpointError(f"unsupported persistent record {pid!r}", self._path)
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"unsupported storage type {dtype!r}", self._path)
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self._storages:
            try:
                raw = bytearray(self._archive.read(f"{self._root}/data/{key}"))
            except KeyError:
                raise CheckpointError(f"storage record data/{key} is missing", self._path) from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) != int(numel) * itemsize:
                raise CheckpointError(f"storage record data/{key} has {len(raw)} bytes, expected "
                                      f"{int(numel) * itemsize}", self._path)
            data = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self._storages[key] = _Storage(data)
        return self._storages[key]


def restricted_load(path: str | os.PathLike) -> Any:
    """Unpickle a zip-format torch checkpoint with the restricted unpickler (see the module docstring)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError("not a zip-format torch checkpoint; the restricted loader reads only those "
                              "(re-save it with torch.save from torch >= 1.6, or convert to safetensors)", path)
    try:
        with zipfile.ZipFile(path) as archive:
            pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise CheckpointError("archive has no single <root>/data.pkl record", path)
            root = pkls[0].split("/")[0]
            if archive.namelist().count(f"{root}/byteorder") and archive.read(f"{root}/byteorder") != b"little":
                raise CheckpointError("big-endian checkpoints are not supported", path)
            with archive.open(pkls[0]) as fh:
                return _RestrictedUnpickler(fh, archive, root, path).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, AttributeError,
            KeyError, IndexError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"corrupt or unsupported checkpoint: {type(exc).__name__}: {exc}", path) from None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # weights_only refused a global: fall through to the restricted unpickler
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError... for corrupt files
        raise CheckpointError(f"cannot read checkpoint: {type(exc).__name__}: {exc}", path) from None
    return restricted_load(path)


def _as_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a state dict (mapping of name -> tensor), got {type(obj).__name__}", path)
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{len(bad)} entries are not tensors: {', '.join(bad[:10])}", path)
    return dict(obj)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``name -> tensor`` from a .safetensors or torch/Lightning checkpoint, safely (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read safetensors file: {exc}", path) from None
    if suffix in TORCH_SUFFIXES:
        return _as_state_dict(_torch_load(path), path)
    raise CheckpointError(f"unsupported checkpoint extension {suffix!r} (use .safetensors, "
                          f"{', '.join(TORCH_SUFFIXES)})", path)
