"""Configs are dataclasses, loadable from YAML, with ``key=value`` overrides.

    cfg = load_config(AlignConfig, "configs/align.yaml", ["train.lr=1e-3", "seed=3"])

Nested dataclasses map to nested YAML mappings; overrides use dotted keys and
YAML value syntax of any shape (``epochs=5``, ``text_space=input``, ``tasks=[T1,T2]``,
``systems_options={respllm: {epochs: 2}}``). A mapping value is merged into the mapping
it overrides (keys it does not name keep their values). Unknown keys are errors, never
silently ignored.

Where a config file is expected, a settings preset may be named instead
(:func:`resolve_config`): ``--config paper`` reads ``configs/paper/<stage>.yaml`` (the paper's
and published code's settings), ``--config cpu`` ``configs/cpu/<stage>.yaml`` (sized for a
2-core CPU, the demo's) and ``--config ours`` ``configs/<stage>.yaml`` (our recommended
settings). ``configs/`` is looked up in the working directory first, then in the source checkout.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from respiramfm.errors import ConfigError
from respiramfm.utils.io import atomic_write_text

T = TypeVar("T")

SOURCE_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the source checkout's configs/
OURS = "ours"  # the settings preset of configs/<stage>.yaml (our recommended settings)
# The YAML file (configs/[NAME/]<stage>.yaml) each config class reads when a preset is named.
STAGE_FILES = {"AlignConfig": "align", "FinetuneConfig": "finetune", "EvaluateConfig": "evaluate",
               "PretrainConfig": "pretrain_audio"}
# Sections a stage's YAML may leave out, then read from the sibling file of another stage: an
# evaluate.yaml without ``finetune:`` (``align:``) uses the finetune.yaml (align.yaml) beside it: one copy.
SIBLING_SECTIONS = {"evaluate": {"finetune": "finetune", "align": "align"}}
_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


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


def config_dirs() -> list[Path]:
    """Where ``configs/`` is looked up: the working directory's, then the source checkout's."""
    dirs = [Path.cwd() / "configs", SOURCE_CONFIGS]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d.resolve() not in {x.resolve() for x in dirs[:i]}]


def find_config(name: str) -> Path | None:
    """``configs/NAME`` (e.g. ``paper/finetune.yaml``) from :func:`config_dirs`; ``None`` when absent."""
    for base in config_dirs():
        if (base / name).is_file():
            return base / name
    return None


def preset_names() -> list[str]:
    """The shipped settings presets: ``ours`` and every folder of ``configs/`` (``paper``, ``cpu``, ...)."""
    names = {OURS}
    for base in config_dirs():
        names.update(d.name for d in base.iterdir() if d.is_dir() and _PRESET_NAME.match(d.name))
    return sorted(names)


def resolve_config(value: str | os.PathLike | None, stage: str) -> Path | None:
    """The YAML file that ``--config VALUE`` means for ``stage`` (align, finetune, evaluate, ...).

    An existing file wins. Otherwise a bare name (no folder, no ``.yaml``) is a settings preset:
    ``ours`` is ``configs/<stage>.yaml``, any other NAME is ``configs/NAME/<stage>.yaml``. A named
    preset without that file is a :class:`ConfigError` listing the presets; anything else is
    returned as a path (and reading it reports the missing file).
    """
    if value is None or str(value) == "":
        return None
    path = Path(value)
    name = str(value)
    if path.is_file() or not _PRESET_NAME.match(name):
        return path
    rel = f"{stage}.yaml" if name == OURS else f"{name}/{stage}.yaml"
    found = find_config(rel)
    if found is not None:
        return found
    names = preset_names()
    where = " or ".join(str(d) for d in config_dirs()) or f"{SOURCE_CONFIGS} (missing)"
    if name in names:
        raise ConfigError(f"settings preset {name!r} has no {stage} settings: configs/{rel} not found in {where}")
    raise ConfigError(f"{name!r} is neither a config file nor a settings preset; presets: {', '.join(names)} "
                      f"(configs/NAME/{stage}.yaml in {where})")


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] | None = None,
                stage: str | None = None) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path``, updated by ``overrides``.

    ``path`` may name a settings preset (``paper``, ``cpu``, ``ours``): see :func:`resolve_config`;
    ``stage`` defaults to the class's entry in :data:`STAGE_FILES` (no entry: ``path`` is a file).
    """
    data = to_dict(cls())
    stage = stage or STAGE_FILES.get(cls.__name__)
    if path is not None and stage:
        path = resolve_config(path, stage)
    if path is not None:
        loaded = _read_mapping(path)
        for section, other in SIBLING_SECTIONS.get(stage or "", {}).items():
            sibling = Path(path).parent / f"{other}.yaml"
            if section not in loaded and isinstance(data.get(section), dict) and sibling.is_file():
                _deep_update(data[section], _read_mapping(sibling))
        _deep_update(data, loaded)
    apply_overrides(data, overrides)
    return from_dict(cls, data, where=str(path) if path else cls.__name__)


def _read_mapping(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror}", path=path) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", path=path) from None
    if not isinstance(loaded, dict):
        raise ConfigError("config file must hold a mapping", path=path)
    return loaded


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
    parser.add_argument("--config", help=f"{config_help}; or a settings preset by name: "
                        f"{', '.join(preset_names())} (configs/NAME/<stage>.yaml; ours = configs/<stage>.yaml)")
    parser.add_argument("--set", dest="overrides", action=_OverrideAction, nargs="+", default=[],
                        metavar="KEY=VALUE",
                        help=f"override a config key (dotted, YAML value of any shape; a mapping merges), e.g. {example}")
