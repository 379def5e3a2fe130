"""Schema-driven fuzzing of every operation in /openapi.json (bounded): no 5xx, answers match the schema.

Complements the hand-written fuzz in test_fuzz.py: schemathesis generates
requests from the published OpenAPI schema (valid and invalid form fields,
missing fields, odd strings) and checks each answer. Hypothesis drives each
operation directly (schemathesis' pytest fixture loader does not support
pytest 9). Skips when schemathesis is not installed.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (response_schema_conformance,  # noqa: E402
                                               status_code_conformance)

MAX_EXAMPLES = 15


def test_every_operation(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen = []
    for result in schema.get_all_operations():
        operation = result.ok()
        seen.append(f"{operation.method.upper()} {operation.path}")

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(checks=[not_a_server_error, status_code_conformance, response_schema_conformance])

        check()
    assert sorted(seen) == ["GET /health", "GET /tasks", "POST /predict", "POST /spectrogram"]
