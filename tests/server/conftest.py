"""Fixtures live in tests/conftest.py (shared with tests/reliability)."""

from ..server_fixtures import MAX_MODEL_LEN, start  # noqa: F401
