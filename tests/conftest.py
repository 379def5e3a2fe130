"""Shared test fixtures: locations of the real data in ../shared (skip cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach a model hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
