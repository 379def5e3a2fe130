"""Helpers the tests import (builders of small synthetic inputs); fixtures live in the conftest files.

``tests/`` is on pytest's ``pythonpath`` (pyproject.toml), so tests import these as ``testkit.<module>``.
"""
