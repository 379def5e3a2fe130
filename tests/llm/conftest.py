"""Fixtures for the LLM tests: real context strings (the model fixtures live in tests/conftest.py)."""

from __future__ import annotations

import pytest

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

