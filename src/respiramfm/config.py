"""Configs are dataclasses, loadable from YAML, with ``key=value`` overrides.

    cfg = load_config(AlignConfig, "configs/align.yaml", ["train.lr=1e-3", "seed=3"])

Nested dataclasses map to nested YAML mappings; overrides use dotted keys and
YAML value syntax of any shape (``epochs=5``, ``text_space=input``, ``tasks=[T1,T2]``,
``systems_options={respllm: {epochs: 2}}``). A mapping value is merged into the mapping
it overrides (keys it does not name keep their values). Unknown keys are errors, never
silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from respiramfm.errors import ConfigError
from respiramfm.utils.io import atomic_write_text

T = TypeVar("T")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys raise ConfigError."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(types_)}")
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists for tuples), suitable for YAML/JSON."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def apply_overrides(data: dict, overrides: Sequence[str] | None) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from None
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a mapping")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            _deep_update(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return data


def join_override_tokens(tokens: Sequence[str]) -> list[str]:
    """Re-join ``--set`` values the shell split at spaces: a token without ``key=`` continues the last one.

    ``--set systems_options={respllm: {epochs: 2}}`` reaches argparse as three tokens; joined
    with single spaces they are the YAML the user wrote.
    """
    out: list[str] = []
    for tok in tokens:
        head = tok.split("=", 1)[0]
        open_ = out and sum(out[-1].count(c) for c in "{[") > sum(out[-1].count(c) for c in "}]")
        if out and (open_ or "=" not in tok or not head or any(c in head for c in " {}[],:'\"")):
            out[-1] = f"{out[-1]} {tok}"
        else:
            out.append(tok)
    return out


class _OverrideAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.extend(join_override_tokens(values))
        setattr(namespace, self.dest, items)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] | None = None) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path``, updated by ``overrides``."""
    data = to_dict(cls())
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config: {exc.strerror}", path=path) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}", path=path) from None
        if not isinstance(loaded, dict):
            raise ConfigError("config file must hold a mapping", path=path)
        _deep_update(data, loaded)
    apply_overrides(data, overrides)
    return from_dict(cls, data, where=str(path) if path else cls.__name__)


def _deep_update(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def add_config_arguments(parser, config_help: str, example: str) -> None:
    """The ``--config FILE`` / ``--set key=value`` pair every config-driven subcommand takes.

    Parsed values land in ``args.config`` and ``args.overrides`` (for :func:`load_config`).
    """
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--set", dest="overrides", action=_OverrideAction, nargs="+", default=[],
                        metavar="KEY=VALUE",
                        help=f"override a config key (dotted, YAML value of any shape; a mapping merges), e.g. {example}")
