"""The token-protected admin API: outbox status and dead letters (list, show, replay, discard)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from litestar.testing import AsyncTestClient

from app.main import create_app
from modules.inventory.commands import AddStock
from modules.orders.commands import OrderLine, PlaceOrder

ADMIN = {"Authorization": "Bearer secret-admin-token"}
PROBLEM = "application/problem+json"
UNKNOWN = 987654321

ADMIN_ROUTES = [
    ("GET", "/admin/outbox"),
    ("GET", "/admin/dead-letters"),
    ("GET", "/admin/dead-letters/1"),
    ("POST", "/admin/dead-letters/1/replay"),
    ("POST", "/admin/dead-letters/1/discard"),
    ("GET", "/admin/services"),
]


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"]
    return body


async def place_order(system, payment_method: str = "pm_card_broken") -> None:
    await system.mediator.send(AddStock(sku="widget", quantity=5))
    await system.mediator.send(
        PlaceOrder(
            customer_id="c-1", lines=(OrderLine(sku="widget", quantity=1),), payment_method=payment_method
        )
    )


@pytest.fixture
async def letter_id(system, relay, db) -> int:
    """One parked dead letter: a broken card's charge, after all its attempts."""
    await place_order(system)
    async with asyncio.timeout(10):
        while not await db.fetchval("SELECT count(*) FROM dead_letters"):
            await relay.drain()
    return await db.fetchval("SELECT id FROM dead_letters")


# -- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
async def test_the_admin_api_refuses_a_request_without_a_token(client, method, path):
    response = await client.request(method, path)

    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "authorization", ["Bearer wrong-token", "Bearer ", "Basic secret-admin-token", "secret-admin-token"]
)
async def test_the_admin_api_refuses_a_wrong_token(client, authorization):
    response = await client.get("/admin/outbox", headers={"Authorization": authorization})

    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


async def test_without_a_configured_admin_token_the_admin_routes_do_not_exist(settings, db):
    app = create_app(replace(settings, admin_token=None), run_relay=False)
    async with AsyncTestClient(app=app) as client:
        response = await client.get("/admin/outbox", headers={"Authorization": "Bearer "})

    assert_problem(response, 404)


# -- outbox ----------------------------------------------------------------------------------------


async def test_the_outbox_status_counts_pending_rows_by_subscriber(client, system):
    await place_order(system, "pm_card_ok")  # the relay is not drained: OrderPlaced waits in the outbox

    response = await client.get("/admin/outbox", headers=ADMIN)

    assert response.status_code == 200, response.text
    rows = {(r["subscriber"], r["status"]): r["rows"] for r in response.json()["by_subscriber"]}
    assert rows[("payments.charge_order", "pending")] == 1
    assert ("orders.project_order_view", "pending") not in rows  # the view is written inline, not relayed
    assert response.json()["dead_letters_parked"] == 0


async def test_the_outbox_status_names_the_key_a_dead_letter_parks(client, letter_id):
    response = await client.get("/admin/outbox", headers=ADMIN)

    body = response.json()
    assert body["dead_letters_parked"] == 1
    [parked] = body["parked_keys"]
    assert (parked["subscriber"], parked["dead_letter_id"]) == ("payments.charge_order", letter_id)


# -- dead letters ----------------------------------------------------------------------------------


async def test_parked_dead_letters_are_listed(client, letter_id):
    response = await client.get("/admin/dead-letters", headers=ADMIN)

    assert response.status_code == 200, response.text
    [letter] = response.json()
    assert (letter["id"], letter["subscriber"], letter["status"]) == (
        letter_id,
        "payments.charge_order",
        "parked",
    )
    assert letter["error_type"] == "CardProcessingError"


async def test_a_dead_letter_is_shown_with_its_payload_error_and_history(client, letter_id):
    response = await client.get(f"/admin/dead-letters/{letter_id}", headers=ADMIN)

    assert response.status_code == 200, response.text
    letter = response.json()
    assert letter["type"] == "orders.OrderPlaced"
    assert letter["payload"]["payment_method"] == "pm_card_broken"  # an object, not a JSON string
    assert isinstance(letter["headers"], dict)
    assert "this card always fails" in letter["error_message"]
    assert "CardProcessingError" in letter["error_traceback"]
    assert [h["action"] for h in letter["history"]] == ["parked"]


async def test_an_unknown_dead_letter_is_a_404_problem(client):
    response = await client.get(f"/admin/dead-letters/{UNKNOWN}", headers=ADMIN)

    assert_problem(response, 404)


@pytest.mark.parametrize("action", ["replay", "discard"])
async def test_resolving_an_unknown_dead_letter_is_a_404_problem(client, action):
    response = await client.post(f"/admin/dead-letters/{UNKNOWN}/{action}", headers=ADMIN)

    assert_problem(response, 404)


async def test_replaying_a_dead_letter_sends_its_row_back_to_the_outbox(client, letter_id, db):
    response = await client.post(f"/admin/dead-letters/{letter_id}/replay", headers=ADMIN)

    assert response.status_code == 200, response.text
    assert response.json() == {"id": letter_id, "status": "replayed"}
    row = await db.fetchrow(
        "SELECT o.status, o.attempts FROM outbox o JOIN dead_letters l ON l.outbox_id = o.id WHERE l.id = $1",
        letter_id,
    )
    assert (row["status"], row["attempts"]) == ("pending", 0)


async def test_a_replayed_dead_letter_records_who_replayed_it(client, letter_id):
    await client.post(f"/admin/dead-letters/{letter_id}/replay", headers=ADMIN)

    letter = (await client.get(f"/admin/dead-letters/{letter_id}", headers=ADMIN)).json()

    assert letter["status"] == "replayed"
    assert letter["resolved_by"].startswith("admin-api:")
    assert [h["action"] for h in letter["history"]] == ["parked", "replayed"]


async def test_discarding_a_dead_letter_removes_its_row_from_the_outbox(client, letter_id, db):
    response = await client.post(f"/admin/dead-letters/{letter_id}/discard", headers=ADMIN)

    assert response.status_code == 200, response.text
    assert response.json() == {"id": letter_id, "status": "discarded"}
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE subscriber = 'payments.charge_order'") == 0


@pytest.mark.parametrize(
    ("first", "then"),
    [("replay", "replay"), ("replay", "discard"), ("discard", "discard"), ("discard", "replay")],
)
async def test_resolving_an_already_resolved_dead_letter_is_a_409_problem(client, letter_id, first, then):
    assert (await client.post(f"/admin/dead-letters/{letter_id}/{first}", headers=ADMIN)).status_code == 200

    response = await client.post(f"/admin/dead-letters/{letter_id}/{then}", headers=ADMIN)

    body = assert_problem(response, 409)
    assert "already" in body["detail"]


async def test_resolved_dead_letters_leave_the_default_list_but_stay_listable(client, letter_id):
    await client.post(f"/admin/dead-letters/{letter_id}/discard", headers=ADMIN)

    parked = (await client.get("/admin/dead-letters", headers=ADMIN)).json()
    everything = (await client.get("/admin/dead-letters", params={"status": "all"}, headers=ADMIN)).json()

    assert parked == []
    assert [(letter["id"], letter["status"]) for letter in everything] == [(letter_id, "discarded")]
