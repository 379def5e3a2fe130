"""Fixtures shared by every test directory.

* where the real data lives in ../shared (tests that need it skip cleanly when it is absent);
* ``model_cache``: one temporary ``RESPIRAMFM_CACHE`` for the whole run, so converted models
  are built at most once per run and never in the user's own cache;
* ``smollm2`` / ``smollm2_pair``: the offline default LLM, converted once per run;
* ``tiny``: tiny random LLM backbones of the real architectures;
* one torch thread for every test and the processes it starts; ``one_thread`` pins it for a module.

Helpers that tests import (not fixtures) live in ``tests/testkit/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

# Tests never reach a model hub. huggingface_hub reads these once, when it is first imported (possibly by
# a session fixture, before any per-test setting), so they are set before anything can import it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402

from respiramfm.llm import smollm  # noqa: E402
from respiramfm.llm.backbones import load_backbone, tiny_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RESPIRAMFM_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures" / "opera_ct"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return DATA


@pytest.fixture(scope="session")
def opera_fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures/opera_ct is absent")
    return FIXTURES


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Iterator[Path]:
    """``RESPIRAMFM_CACHE`` for the whole run (subprocesses inherit it); removed at the end."""
    path = tmp_path_factory.mktemp("respiramfm-cache")
    old = os.environ.get("RESPIRAMFM_CACHE")
    os.environ["RESPIRAMFM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("RESPIRAMFM_CACHE", None)
    else:
        os.environ["RESPIRAMFM_CACHE"] = old
    shutil.rmtree(path, ignore_errors=True)  # a converted SmolLM2 is ~540 MB; pytest keeps old tmp dirs


NEEDS_SMOLLM2 = pytest.StashKey[bool]()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only the tests that will run count
def pytest_collection_modifyitems(config, items):
    config.stash[NEEDS_SMOLLM2] = any("smollm2" in item.fixturenames for item in items)


@pytest.fixture(scope="session", autouse=True)
def _smollm2_first(request, model_cache) -> None:
    """When any selected test uses the real SmolLM2, convert it before the first test runs.

    So the run's one conversion happens in ``smollm2`` even if a test that loads the model without
    asking for the fixture (e.g. through a default config) happens to run earlier.
    """
    if request.config.stash.get(NEEDS_SMOLLM2, False):
        request.getfixturevalue("smollm2")


@pytest.fixture(scope="session")
def smollm2(model_cache):
    """SmolLM2-135M-Instruct as first loaded in this run: read from the bundled GGUF and converted.

    Every test that loads the real SmolLM2 requests this fixture (or ``smollm2_pair``); the first
    request comes from ``_smollm2_first``, so the run's one conversion happens here and every later
    load reads the converted folder.
    """
    pytest.importorskip("gguf")
    folder = smollm.cache_dir_for(smollm.gguf_sha256())
    if smollm.is_complete(folder):
        pytest.fail("SmolLM2 was converted before the smollm2 fixture ran")
    return load_backbone("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_pair(smollm2):
    """(first, second) loads of the offline default: the first converted the GGUF, the second reads the cache."""
    return smollm2, load_backbone("smollm2-135m")


@pytest.fixture(scope="session")
def tiny():
    """Factory for tiny random backbones (real architectures, real SmolLM2 tokenizer): ``tiny(arch, **kw)``."""
    def make(arch: str = "llama", **kw):
        return tiny_backbone(arch, **kw)

    return make


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tests run torch on one thread, and so do the processes they start (``OMP_NUM_THREADS``).

    Test models are tiny: a second OpenMP thread only adds synchronisation, and on a shared machine the
    threads wait for each other (measured 10-80x slower with two). The real SmolLM2's tests feed it a
    few short texts, small matrices too. A test may still set its own count.
    """
    old_env, old = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Pin one torch thread for a module whatever an earlier test left set (the session default is one)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
