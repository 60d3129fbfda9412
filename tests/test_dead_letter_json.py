"""A dead letter's payload and headers are JSON objects wherever it is shown: `switchboard dlq
show` and GET /admin/dead-letters/{id} print objects, not JSON strings."""

from __future__ import annotations

import asyncio
import json

import pytest

from app.relay import dead_letters
from tests.test_admin_api import ADMIN, place_order
from tests.test_cli import switchboard


@pytest.fixture
async def letter_id(system, relay, db) -> int:
    """One parked dead letter: a broken card's charge, after all its attempts."""
    await place_order(system, "pm_card_broken")
    async with asyncio.timeout(10):
        while not await db.fetchval("SELECT count(*) FROM dead_letters"):
            await relay.drain()
    return await db.fetchval("SELECT id FROM dead_letters")


def assert_objects(letter: dict) -> None:
    assert isinstance(letter["payload"], dict), letter["payload"]
    assert letter["payload"]["type"] == "orders.OrderPlaced"
    assert letter["payload"]["payment_method"] == "pm_card_broken"
    assert letter["payload"]["lines"] == [{"sku": "widget", "quantity": 1}]
    assert isinstance(letter["headers"], dict), letter["headers"]


async def test_get_dead_letter_returns_payload_and_headers_as_objects(db, letter_id):
    letter = await dead_letters.get_dead_letter(db, letter_id)

    assert_objects(letter)
    stored = await db.fetchrow("SELECT payload, headers FROM dead_letters WHERE id = $1", letter_id)
    assert (letter["payload"], letter["headers"]) == (json.loads(stored["payload"]), json.loads(stored["headers"]))


async def test_dlq_show_prints_payload_and_headers_as_objects(database_url, letter_id):
    code, out, err = await switchboard(database_url, "dlq", "show", str(letter_id))

    assert code == 0, err
    assert_objects(json.loads(out))


async def test_the_admin_api_shows_payload_and_headers_as_objects(client, letter_id):
    response = await client.get(f"/admin/dead-letters/{letter_id}", headers=ADMIN)

    assert response.status_code == 200, response.text
    assert_objects(response.json())
