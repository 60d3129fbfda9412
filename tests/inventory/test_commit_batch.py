"""inventory.commit_reservation is a batch subscription: a relay run's PaymentCaptured rows move
their holds in one statement and record each order's Stock events under that order's own
correlation and causation, all appended in one statement; an order whose hold cannot be retaken
fails only its own delivery."""

from __future__ import annotations

import app.relay
from app.messages import ConcurrencyError
from app.relay import fast
from app.relay.delivery import GROUP_SIZE
from modules.inventory.handlers import release_expired
from tests.payments.test_charge_batch import order
from tests.test_order_flow import dead_letters, level, stock

COMMIT = "inventory.commit_reservation"

STOCK_EVENTS_SQL = """
SELECT s.data->>'order_id' AS order_id, s.type, s.xmin::text AS tx, s.metadata->>'correlation_id' AS correlation,
       s.metadata->>'causation_id' AS causation, p.event_id::text AS captured
FROM events s JOIN events p ON p.stream_id = 'payment-' || (s.data->>'order_id') AND p.type = 'payments.PaymentCaptured'
WHERE s.stream_id LIKE 'stock-%' AND s.type <> 'inventory.StockReserved'
"""


async def test_a_runs_holds_commit_in_one_transaction_each_with_its_orders_ids(client, app_relay, db, monkeypatch):
    monkeypatch.setattr(app.relay, "RUN_HOLD_SECONDS", 0.0)  # a per-row subscription: a commit per delivery
    await stock(client, "widget")
    await stock(client, "gadget")
    orders = {
        await order(client, "pm_card_ok", f"req-{i}", sku=sku): f"req-{i}"
        for i, sku in enumerate(["widget", "gadget", "widget"])
    }

    await app_relay.drain()

    rows = await db.fetch(STOCK_EVENTS_SQL)
    assert sorted(r["type"] for r in rows) == ["inventory.ReservationCommitted"] * 3, rows
    assert len({r["tx"] for r in rows}) == 1, rows  # one run, one append (two of them on one stream)
    for r in rows:
        assert r["correlation"] == orders[r["order_id"]], r
        assert r["causation"] == r["captured"], r  # caused by its own PaymentCaptured
    assert await level(client, "widget") == {"sku": "widget", "available": 8, "reserved": 0}
    assert await level(client, "gadget") == {"sku": "gadget", "available": 9, "reserved": 0}


async def test_a_hold_that_cannot_be_retaken_dead_letters_alone_and_the_others_commit_once(client, app_relay, db):
    await stock(client, "scarce", quantity=2)
    await stock(client, "widget")
    late = await order(client, "pm_card_ok", "late", sku="scarce", quantity=2)
    assert await release_expired(client.app.state.system.uow, 0.0) == 1  # the sweeper took it for an orphan
    others = {
        await order(client, "pm_card_ok", "took-the-units", sku="scarce", quantity=2): "scarce",
        await order(client, "pm_card_ok", "w-1", sku="widget"): "widget",
        await order(client, "pm_card_ok", "w-2", sku="widget"): "widget",
    }

    await app_relay.drain()

    rows = await db.fetch(STOCK_EVENTS_SQL)
    committed = [r["order_id"] for r in rows if r["type"] == "inventory.ReservationCommitted"]
    assert sorted(committed) == sorted(others), rows  # each once
    assert not [r for r in rows if r["type"] == "inventory.ReservationRetaken"], rows
    [letter] = await dead_letters(db, COMMIT)
    assert letter["partition_key"] == f"payment-{late}" and letter["error_type"] == "PermanentError", dict(letter)
    statuses = dict(await db.fetch("SELECT order_id::text, status FROM inventory_reservations"))
    assert statuses == {late: "released"} | dict.fromkeys(others, "committed")
    assert await level(client, "scarce") == {"sku": "scarce", "available": 0, "reserved": 0}
    assert await level(client, "widget") == {"sku": "widget", "available": 8, "reserved": 0}


async def test_concurrent_runs_on_one_sku_queue_instead_of_losing_the_append_race(client, app_relay, monkeypatch):
    # A claim's rows are delivered in groups of at most GROUP_SIZE, at once: with every order on
    # one SKU, two commit_reservation runs load the same Stock stream unless they queue for it.
    lost = []
    run = fast.run

    async def counted(delivery, subscriber, rows, seen, hold_seconds):
        try:
            return await run(delivery, subscriber, rows, seen, hold_seconds)
        except fast.HandlerFailed as failed:
            if subscriber == COMMIT and isinstance(failed.error, ConcurrencyError):
                lost.append(len(rows))
            raise

    monkeypatch.setattr(fast, "run", counted)
    await stock(client, "widget", quantity=1000)
    orders = [await order(client, "pm_card_ok", f"r-{i}") for i in range(3 * GROUP_SIZE)]

    await app_relay.drain()

    assert lost == []
    assert await level(client, "widget") == {"sku": "widget", "available": 1000 - len(orders), "reserved": 0}
