"""Fixtures for the LLM tests: a per-session model cache, so SmolLM2 is converted once per run.

Every test in this directory sees ``RESPIRAMFM_CACHE`` pointing at that session
directory, so no test reads or writes the user's real cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest


@pytest.fixture(scope="session")
def llm_cache(tmp_path_factory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("respiramfm-cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)  # the converted model is ~540 MB; pytest keeps old tmp dirs


@pytest.fixture(autouse=True)
def _session_model_cache(llm_cache, monkeypatch):
    monkeypatch.setenv("RESPIRAMFM_CACHE", str(llm_cache))


@pytest.fixture(scope="session")
def smollm2_pair(llm_cache):
    """(first, second) loads of the offline default: the first converts the GGUF, the second reads the cache."""
    from respiramfm.llm.backbones import load_backbone

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESPIRAMFM_CACHE", str(llm_cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        first = load_backbone("smollm2-135m")
        second = load_backbone("smollm2-135m")
    return first, second


@pytest.fixture
def tiny():
    """Factory for tiny random backbones (real architectures, real SmolLM2 tokenizer)."""
    from respiramfm.llm.backbones import tiny_backbone

    def make(arch: str = "llama", **kw):
        return tiny_backbone(arch, **kw)

    return make


CONTEXTS = [
    "Gender: female. Age: 70. Record location: left anterior chest. "
    "Patient presents with the following medical history conditions: copd. "
    "Patient presents with the following respiratory symptoms: dry cough, fever. ",
    "Patient presents with no obvious respiratory symptoms.",
    "Gender: male. Age: 3. Patient presents with no medical history conditions. Smoker: no.",
    "Age: not reported.",
    "Record location: trachea.",
]


@pytest.fixture
def contexts() -> list[str]:
    return list(CONTEXTS)

