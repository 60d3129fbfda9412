"""Fixtures of the relay tests (tests/app/relay_worker.py has their module and helpers)."""

from __future__ import annotations

import pytest

from tests.app.relay_worker import reset_effects


@pytest.fixture
async def effects(db) -> None:
    """An empty relay_test_effects table (created on first use). Relay test modules use it with
    `pytestmark = pytest.mark.usefixtures("effects")`."""
    await reset_effects(db)
