"""payments.charge_order is a batch subscription: a relay run's OrderPlaced rows are charged in
one handler call (their payments loaded in one SELECT) and appended in one statement, each
payment's event under its own order's correlation and causation; a card that fails fails only
its own delivery."""

from __future__ import annotations

from uuid import UUID

import app.relay
from modules.payments.gateway import fake_provider
from tests.test_order_flow import CHARGE, dead_letters, drain_until, order_status, stock


async def order(client, payment_method: str, request_id: str, sku: str = "widget", quantity: int = 1) -> str:
    response = await client.post(
        "/orders",
        json={"customer_id": "c-1", "items": [{"sku": sku, "quantity": quantity}], "payment_method": payment_method},
        headers={"X-Request-ID": request_id},
    )
    assert response.status_code == 201, response.text
    return response.json()["order_id"]


async def test_a_runs_charges_append_in_one_transaction_each_with_its_orders_ids(client, app_relay, db, monkeypatch):
    # Hold 0: a per-row subscription commits after every delivery that recorded; a batch's run is one.
    monkeypatch.setattr(app.relay, "RUN_HOLD_SECONDS", 0.0)
    await stock(client)
    orders = {await order(client, "pm_card_ok", f"req-{i}"): f"req-{i}" for i in range(3)}

    await app_relay.drain()

    rows = await db.fetch(
        "SELECT p.stream_id, p.xmin::text AS tx, p.metadata->>'correlation_id' AS correlation,"
        " p.metadata->>'causation_id' AS causation, o.event_id::text AS placed"
        " FROM events p JOIN events o ON o.stream_id = 'order-' || substr(p.stream_id, 9)"
        " AND o.type = 'orders.OrderPlaced' WHERE p.stream_id LIKE 'payment-%'"
    )
    assert len(rows) == 3 and len({r["tx"] for r in rows}) == 1, rows  # one run, one append
    for r in rows:
        assert r["correlation"] == orders[r["stream_id"].removeprefix("payment-")], r
        assert r["causation"] == r["placed"], r  # caused by its own OrderPlaced, not the run's first
    assert [fake_provider.calls[UUID(o)] for o in orders] == [1, 1, 1]


async def test_a_broken_card_in_a_batch_dead_letters_alone_and_the_others_are_charged_once(client, app_relay, db):
    await stock(client)
    before = [await order(client, "pm_card_ok", f"ok-{i}") for i in range(2)]
    broken = await order(client, "pm_card_broken", "broken")
    after = await order(client, "pm_card_ok", "ok-after")

    async def failed() -> bool:
        return await order_status(client, broken) == "payment_failed"

    await drain_until(app_relay, failed)
    await app_relay.drain()

    for order_id in [*before, after]:
        assert await order_status(client, order_id) == "paid"
        assert await db.fetchval(
            "SELECT count(*) FROM events WHERE stream_id = $1 AND type = 'payments.PaymentCaptured'", f"payment-{order_id}"
        ) == 1  # fmt: skip
    # The orders before the broken card were charged in the run that was rolled back, then again
    # alone -- with the same idempotency key, so the provider charges them once; the one after
    # it was not charged in that run at all.
    assert [fake_provider.calls[UUID(o)] for o in before] == [2, 2]
    assert fake_provider.calls[UUID(after)] == 1
    [letter] = await dead_letters(db, CHARGE)
    assert letter["partition_key"] == f"order-{broken}" and letter["attempts"] == 5
    assert fake_provider.calls[UUID(broken)] == 6  # its five attempts, the first also in the batch
    assert await db.fetchval(
        "SELECT count(*) FROM events WHERE stream_id = $1 AND type = 'payments.PaymentFailed'", f"payment-{broken}"
    ) == 1  # fmt: skip  (compensated once)
