"""Static guards over the package source: every torch.load passes weights_only=True, nothing calls
pickle.load(s) and nothing loads a state dict with strict=False.

An AST scan (not a grep), so comments and docstrings that mention these calls do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "respiramfm"
FILES = sorted(SRC.rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


def _kw(node: ast.Call, key: str):
    for k in node.keywords:
        if k.arg == key:
            return k.value
    return None


def scan(source: str) -> list[str]:
    """Problems in one module's source (exposed so the guard itself is tested below)."""
    problems = []
    for node, owner, name in _calls(ast.parse(source)):
        where = f"line {node.lineno}"
        if owner == "torch" and name == "load":
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        if owner in ("pickle", "dill", "cloudpickle") and name in ("load", "loads"):
            problems.append(f"{where}: {owner}.{name}")
        strict = _kw(node, "strict")
        if name in ("load_state_dict", "load_model", "set_peft_model_state_dict") and isinstance(strict, ast.Constant) \
                and strict.value is False:
            problems.append(f"{where}: {name}(strict=False)")
    return problems


def test_the_guard_catches_what_it_should():
    bad = ("import torch, pickle\n"
           "a = torch.load('x')\n"
           "b = torch.load('x', weights_only=False)\n"
           "c = pickle.loads(b'')\n"
           "m.load_state_dict(s, strict=False)\n")
    assert [p.split(":")[1].strip() for p in scan(bad)] == [
        "torch.load without weights_only=True", "torch.load without weights_only=True", "pickle.loads",
        "load_state_dict(strict=False)"]
    assert scan("import torch\n# torch.load('x')\ny = torch.load('x', weights_only=True)\n") == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_package_source_loads_safely(path):
    assert scan(path.read_text(encoding="utf-8")) == [], path
