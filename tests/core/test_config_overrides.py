"""``--set`` takes YAML values of any shape, including mappings split by the shell at spaces."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from respiramfm.config import add_config_arguments, join_override_tokens, load_config
from respiramfm.errors import ConfigError


@dataclass
class Inner:
    epochs: int = 3
    lr: float = 1e-3


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    options: dict = field(default_factory=lambda: {"respllm": {"epochs": 40, "batch": 32}})
    tasks: list[str] = field(default_factory=list)


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p, "config", "inner.epochs=5")
    p.add_argument("--out")
    return p.parse_args(argv)


def test_shell_split_mapping_is_rejoined():
    args = _parse(["--set", "options={respllm:", "{epochs:", "2}}", "name=y", "--out", "o"])
    assert args.overrides == ["options={respllm: {epochs: 2}}", "name=y"] and args.out == "o"
    cfg = load_config(Outer, None, args.overrides)
    # the mapping merges: batch keeps its value, epochs changes
    assert cfg.options == {"respllm": {"epochs": 2, "batch": 32}} and cfg.name == "y"


def test_repeated_set_and_lists_and_nested_mapping(tmp_path):
    args = _parse(["--set", "tasks=[T1,", "T2]", "--set", "inner={epochs: 7}"])
    cfg = load_config(Outer, None, args.overrides)
    assert cfg.tasks == ["T1", "T2"] and cfg.inner == Inner(epochs=7, lr=1e-3)


def test_join_keeps_separate_assignments():
    assert join_override_tokens(["a=1", "b.c=[1, 2]", "d={x: 1}"]) == ["a=1", "b.c=[1, 2]", "d={x: 1}"]
    assert join_override_tokens(["a={x:", "y=1}"]) == ["a={x: y=1}"]


def test_mapping_into_a_scalar_key_is_an_error():
    with pytest.raises(ConfigError, match="inner.epochs"):
        load_config(Outer, None, ["inner={epochs: {a: 1}}"])
