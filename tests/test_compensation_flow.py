"""A charge that ends in the dead letters ends the business process too: the order becomes
payment_failed, its stock goes back, the customer is told once. Replaying or discarding the
dead letter afterwards changes nothing more."""

from __future__ import annotations

from uuid import UUID

import pytest

from modules.inventory.queries import GetStockLevel
from modules.payments.aggregate import Payment
from modules.payments.gateway import fake_provider
from tests.test_order_flow import ADMIN, dead_letters, drain_until, level, order_status, stocked_order

FAILED = "payments.PaymentFailed"


async def failed_order(client, app_relay, db, quantity: int = 3) -> dict:
    """A broken card's order, after its charge was dead-lettered and every subscriber of the
    compensation delivered."""
    placed = await stocked_order(client, "pm_card_broken", quantity=quantity)

    async def ended() -> bool:
        return await order_status(client, placed["order_id"]) == "payment_failed"

    await drain_until(app_relay, ended)
    await app_relay.drain()
    return placed


async def notifications(client, order_id: str) -> list[str]:
    response = await client.get("/notifications", params={"order_id": order_id})
    assert response.status_code == 200, response.text
    return [n["kind"] for n in response.json()]


async def outcome(client, db, order_id: str) -> tuple:
    """Everything the order's end shows: its status, the stock, notifications, events, charges."""
    return (
        await order_status(client, order_id),
        await level(client),
        await notifications(client, order_id),
        [r["type"] for r in await db.fetch("SELECT type FROM events ORDER BY position")],
        fake_provider.calls[UUID(order_id)],
    )


async def test_a_dead_lettered_charge_ends_the_order_payment_failed(client, app_relay, db):
    placed = await failed_order(client, app_relay, db)

    response = await client.get(f"/orders/{placed['order_id']}")

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "payment_failed"


async def test_a_dead_lettered_charge_gives_the_reserved_stock_back(client, app_relay, db):
    await failed_order(client, app_relay, db, quantity=3)

    assert await level(client) == {"sku": "widget", "available": 10, "reserved": 0}
    level_view = await client.app.state.system.mediator.ask(GetStockLevel(sku="widget"))
    assert (level_view.available, level_view.reserved) == (10, 0)
    released = await db.fetch("SELECT status FROM inventory_reservations")
    assert [r["status"] for r in released] == ["released"]


async def test_a_dead_lettered_charge_tells_the_customer_exactly_once(client, app_relay, db):
    placed = await failed_order(client, app_relay, db)

    assert await notifications(client, placed["order_id"]) == ["payment_failed"]


async def test_a_dead_lettered_charge_records_one_payment_failed_with_the_error_as_its_reason(
    client, app_relay, db
):
    placed = await failed_order(client, app_relay, db)

    [event] = await db.fetch("SELECT stream_id, data FROM events WHERE type = $1", FAILED)
    assert event["stream_id"] == f"payment-{placed['order_id']}"
    assert "CardProcessingError: processor error: this card always fails" in event["data"]
    [letter] = await dead_letters(db)
    assert (letter["status"], letter["compensation"]) == ("parked", "compensated")


@pytest.mark.outbox_retention(3600)  # reads delivered rows
async def test_replaying_the_dead_letter_of_a_failed_payment_charges_nothing_and_changes_nothing(
    client, app_relay, db
):
    placed = await failed_order(client, app_relay, db)
    [letter] = await dead_letters(db)
    before = await outcome(client, db, placed["order_id"])

    response = await client.post(f"/admin/dead-letters/{letter['id']}/replay", headers=ADMIN)
    assert response.status_code == 200, response.text
    await app_relay.drain()

    assert await outcome(client, db, placed["order_id"]) == before
    assert fake_provider.calls[UUID(placed["order_id"])] == 5  # the five attempts before it was parked
    assert [r["status"] for r in await dead_letters(db)] == ["replayed"]
    assert await db.fetchval("SELECT status FROM outbox WHERE id = $1", letter["outbox_id"]) == "delivered"


async def test_discarding_the_dead_letter_of_a_failed_payment_changes_nothing_further(client, app_relay, db):
    placed = await failed_order(client, app_relay, db)
    [letter] = await dead_letters(db)
    before = await outcome(client, db, placed["order_id"])

    response = await client.post(f"/admin/dead-letters/{letter['id']}/discard", headers=ADMIN)
    assert response.status_code == 200, response.text
    await app_relay.drain()

    assert await outcome(client, db, placed["order_id"]) == before
    assert [r["status"] for r in await dead_letters(db)] == ["discarded"]


async def test_a_failed_compensation_leaves_the_order_placed_and_a_replay_charges_again(
    client, app_relay, db, monkeypatch
):
    def broken(self, payment_method: str, reason: str) -> None:
        raise RuntimeError("the ledger is down")

    monkeypatch.setattr(Payment, "fail", broken)
    placed = await stocked_order(client, "pm_card_broken")
    await drain_until(app_relay, lambda: _has_letter(db))
    await app_relay.drain()

    [letter] = await dead_letters(db)
    assert (letter["status"], letter["compensation"]) == (
        "parked",
        "compensation failed: RuntimeError: the ledger is down",
    )
    assert await order_status(client, placed["order_id"]) == "placed"
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = $1", FAILED) == 0

    monkeypatch.undo()  # the ledger is back: a replay charges again, and compensates this time
    await client.post(f"/admin/dead-letters/{letter['id']}/replay", headers=ADMIN)

    async def ended() -> bool:
        return await order_status(client, placed["order_id"]) == "payment_failed"

    await drain_until(app_relay, ended)
    await app_relay.drain()
    assert fake_provider.calls[UUID(placed["order_id"])] == 10
    assert [(r["status"], r["compensation"]) for r in await dead_letters(db)] == [
        ("replayed", "compensation failed: RuntimeError: the ledger is down"),
        ("parked", "compensated"),
    ]
    assert await notifications(client, placed["order_id"]) == ["payment_failed"]


async def _has_letter(db) -> bool:
    return bool(await dead_letters(db))
