"""Fixtures shared by the baseline tests: the synthetic fine-tuning set (thread fixtures are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from testkit.finetune_synth import make_synth


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"))
