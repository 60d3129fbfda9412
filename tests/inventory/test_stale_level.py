"""GetStockLevel's fallback at the HTTP edge, and readiness with a breaker open (issue 12)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.settings import Settings


@pytest.fixture
def settings(base_settings: Settings) -> Settings:
    return replace(base_settings, breaker_reset_seconds=30.0)  # stays open for the whole test


async def test_a_level_inventory_cannot_give_now_is_the_last_one_seen_marked_stale(client):
    assert (await client.post("/inventory/items", json={"sku": "lamp", "quantity": 3})).status_code == 201
    fresh = await client.get("/inventory/items/lamp")
    assert fresh.status_code == 200 and "warning" not in fresh.headers
    assert fresh.json() == {"sku": "lamp", "available": 3, "reserved": 0}

    client.app.state.system.mediator.breakers["inventory"].open()
    stale = await client.get("/inventory/items/lamp")

    assert stale.status_code == 200
    assert stale.json() == {"sku": "lamp", "available": 3, "reserved": 0, "stale": True}
    assert stale.headers["warning"] == '110 - "Response is Stale"'


async def test_a_level_never_read_before_is_still_a_503_while_inventory_is_unavailable(client):
    assert (await client.post("/inventory/items", json={"sku": "lamp", "quantity": 3})).status_code == 201
    client.app.state.system.mediator.breakers["inventory"].open()

    response = await client.get("/inventory/items/desk")

    assert response.status_code == 503 and response.headers["content-type"].startswith("application/problem+json")
    assert "circuit open" in response.json()["detail"] and "retry-after" in response.headers


async def test_readiness_says_503_while_a_hosted_modules_breaker_refuses_calls(client):
    assert (await client.get("/health/ready")).status_code == 200

    client.app.state.system.mediator.breakers["inventory"].open()
    response = await client.get("/health/ready")

    assert response.status_code == 503
    assert response.json() == {"status": "circuit open", "modules": ["inventory"]}
    assert 1 <= int(response.headers["retry-after"]) <= 30
