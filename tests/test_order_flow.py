"""The modules together, through HTTP and the relay: place an order, pay it (or not), read it back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from uuid import UUID

import pytest

from app.relay import Relay
from modules.payments.gateway import fake_provider

ADMIN = {"Authorization": "Bearer secret-admin-token"}
CHARGE = "payments.charge_order"


async def stock(client, sku: str = "widget", quantity: int = 10) -> None:
    response = await client.post("/inventory/items", json={"sku": sku, "quantity": quantity})
    assert response.status_code == 201, response.text


async def place(client, payment_method: str = "pm_card_ok", sku: str = "widget", quantity: int = 2):
    return await client.post(
        "/orders",
        json={
            "customer_id": "c-1",
            "items": [{"sku": sku, "quantity": quantity}],
            "payment_method": payment_method,
        },
    )


async def stocked_order(client, payment_method: str, quantity: int = 2) -> dict:
    await stock(client)
    response = await place(client, payment_method, quantity=quantity)
    assert response.status_code == 201, response.text
    return response.json()


async def drain_until(relay: Relay, done: Callable[[], Awaitable[bool]]) -> None:
    """Deliver what is due until `done()` holds; retries become due after their (tiny) backoff."""
    async with asyncio.timeout(10):
        while True:
            await relay.drain()
            if await done():
                return


async def order_status(client, order_id: str) -> str | None:
    response = await client.get(f"/orders/{order_id}")
    return response.json()["status"] if response.status_code == 200 else None


async def level(client, sku: str = "widget") -> dict:
    response = await client.get(f"/inventory/items/{sku}")
    assert response.status_code == 200, response.text
    return response.json()


async def dead_letters(db, subscriber: str = CHARGE) -> list:
    return await db.fetch("SELECT * FROM dead_letters WHERE subscriber = $1 ORDER BY id", subscriber)


# -- placing and reading -------------------------------------------------------------------------


async def test_placing_an_order_answers_201_with_its_location_and_position(client):
    await stock(client)

    response = await place(client)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "placed"
    assert UUID(body["order_id"])
    assert isinstance(body["position"], int) and body["position"] > 0
    assert response.headers["location"] == f"/orders/{body['order_id']}"
    assert response.headers["x-switchboard-position"] == str(body["position"])


async def test_an_order_reads_placed_right_after_it_is_placed_with_no_relay_running(client):
    placed = await stocked_order(client, "pm_card_ok")

    response = await client.get(f"/orders/{placed['order_id']}")  # no relay ran: the view is inline

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "placed"
    assert response.json()["items"] == [{"sku": "widget", "quantity": 2}]


async def test_reading_an_order_after_its_position_answers_with_the_order(client, app_relay):
    placed = await stocked_order(client, "pm_card_ok")

    app_relay.start()
    try:
        response = await client.get(f"/orders/{placed['order_id']}", params={"after": placed["position"]})
    finally:
        await app_relay.stop()

    assert response.status_code == 200, response.text
    assert response.json()["order_id"] == placed["order_id"]
    assert response.json()["items"] == [{"sku": "widget", "quantity": 2}]


async def test_reading_an_order_with_the_position_header_waits_for_the_projection(client, app_relay):
    placed = await stocked_order(client, "pm_card_ok")

    app_relay.start()
    try:
        response = await client.get(
            f"/orders/{placed['order_id']}", headers={"X-Switchboard-Position": str(placed["position"])}
        )
    finally:
        await app_relay.stop()

    assert response.status_code == 200, response.text
    assert response.json()["order_id"] == placed["order_id"]


async def test_placing_an_order_reserves_its_stock_at_once(client):
    await stocked_order(client, "pm_card_ok", quantity=3)

    assert await level(client) == {"sku": "widget", "available": 7, "reserved": 3}


async def test_ordering_more_than_is_in_stock_is_a_409_problem_and_reserves_nothing(client):
    await stock(client, quantity=1)

    response = await place(client, quantity=2)

    assert response.status_code == 409, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 409
    assert await level(client) == {"sku": "widget", "available": 1, "reserved": 0}


# -- payment outcomes ------------------------------------------------------------------------------


async def test_an_order_paid_with_a_good_card_ends_paid(client, app_relay):
    placed = await stocked_order(client, "pm_card_ok")

    await drain_until(app_relay, lambda: _status_is(client, placed["order_id"], "paid"))

    assert await order_status(client, placed["order_id"]) == "paid"


async def test_a_paid_order_sends_the_customer_exactly_one_notification(client, app_relay):
    placed = await stocked_order(client, "pm_card_ok")
    await drain_until(app_relay, lambda: _status_is(client, placed["order_id"], "paid"))
    await app_relay.drain()  # anything still due (none should add a notification)

    response = await client.get("/notifications", params={"order_id": placed["order_id"]})

    assert response.status_code == 200
    assert [n["kind"] for n in response.json()] == ["payment_captured"]


async def test_a_paid_order_commits_its_reserved_stock(client, app_relay):
    placed = await stocked_order(client, "pm_card_ok", quantity=3)

    await drain_until(app_relay, lambda: _level_is(client, available=7, reserved=0))

    assert await level(client) == {"sku": "widget", "available": 7, "reserved": 0}
    assert await order_status(client, placed["order_id"]) == "paid"


async def test_a_declined_card_ends_the_order_payment_declined(client, app_relay):
    placed = await stocked_order(client, "pm_card_declined")

    await drain_until(app_relay, lambda: _status_is(client, placed["order_id"], "payment_declined"))

    assert await order_status(client, placed["order_id"]) == "payment_declined"


async def test_a_declined_card_gives_the_reserved_stock_back(client, app_relay):
    placed = await stocked_order(client, "pm_card_declined", quantity=3)

    await drain_until(app_relay, lambda: _status_is(client, placed["order_id"], "payment_declined"))
    await app_relay.drain()

    assert await level(client) == {"sku": "widget", "available": 10, "reserved": 0}


async def test_a_flaky_card_fails_its_first_charge_and_is_scheduled_for_a_retry(client, app_relay, db):
    await stocked_order(client, "pm_card_flaky")

    await app_relay.run_once()  # one delivery of OrderPlaced to every subscriber

    row = await db.fetchrow("SELECT status, attempts, last_error FROM outbox WHERE subscriber = $1", CHARGE)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert "processor timeout (attempt 1)" in row["last_error"]


async def test_a_flaky_card_is_paid_after_three_attempts_and_charged_once(client, app_relay, db):
    placed = await stocked_order(client, "pm_card_flaky")

    await drain_until(app_relay, lambda: _status_is(client, placed["order_id"], "paid"))

    assert fake_provider.calls[UUID(placed["order_id"])] == 3
    assert await db.fetchval(
        "SELECT count(*) FROM outbox WHERE subscriber = $1 AND status <> 'delivered'", CHARGE
    ) == 0  # acknowledged
    captured = await db.fetchval("SELECT count(*) FROM events WHERE type = 'payments.PaymentCaptured'")
    assert captured == 1
    assert await dead_letters(db) == []


async def test_a_broken_card_is_dead_lettered_and_the_order_ends_payment_failed(client, app_relay, db):
    placed = await stocked_order(client, "pm_card_broken")

    await drain_until(app_relay, lambda: _has_dead_letters(db, 1))
    await app_relay.drain()

    [letter] = await dead_letters(db)
    assert letter["status"] == "parked"
    assert letter["attempts"] == 5  # the subscription's max_attempts
    assert letter["error_type"] == "CardProcessingError"
    assert letter["compensation"] == "compensated"  # payments.fail_payment ran with the parking
    assert fake_provider.calls[UUID(placed["order_id"])] == 5
    assert await order_status(client, placed["order_id"]) == "payment_failed"


@pytest.mark.outbox_retention(3600)  # reads delivered rows
async def test_replaying_a_compensated_charge_charges_nothing_and_keeps_its_history(client, app_relay, db):
    placed = await stocked_order(client, "pm_card_broken")
    await drain_until(app_relay, lambda: _has_dead_letters(db, 1))
    await app_relay.drain()
    [first] = await dead_letters(db)

    response = await client.post(f"/admin/dead-letters/{first['id']}/replay", headers=ADMIN)
    assert response.status_code == 200, response.text
    await app_relay.drain()

    [old] = await dead_letters(db)  # the replayed charge found the payment failed: no new letter
    assert fake_provider.calls[UUID(placed["order_id"])] == 5  # and no attempt after the replay
    assert old["status"] == "replayed"
    assert await db.fetchval("SELECT status FROM outbox WHERE id = $1", old["outbox_id"]) == "delivered"
    history = (await client.get(f"/admin/dead-letters/{old['id']}", headers=ADMIN)).json()["history"]
    assert [h["action"] for h in history] == ["parked", "replayed"]
    assert await order_status(client, placed["order_id"]) == "payment_failed"


# -- concurrency -----------------------------------------------------------------------------------


async def test_fifty_concurrent_orders_for_ten_units_never_oversell(client):
    await stock(client, quantity=10)

    responses = await asyncio.gather(*(place(client, quantity=1) for _ in range(50)))

    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) == 10, [r.text for r in responses if r.status_code not in (201, 409)]
    assert statuses.count(409) == 40
    assert all(r.json()["title"] == "Command rejected" for r in responses if r.status_code == 409)
    assert await level(client) == {"sku": "widget", "available": 0, "reserved": 10}


# -- conditions ------------------------------------------------------------------------------------


async def _status_is(client, order_id: str, status: str) -> bool:
    return await order_status(client, order_id) == status


async def _level_is(client, *, available: int, reserved: int) -> bool:
    current = await level(client)
    return (current["available"], current["reserved"]) == (available, reserved)


async def _has_dead_letters(db, count: int) -> bool:
    return len(await dead_letters(db)) >= count
