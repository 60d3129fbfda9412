"""Two process groups, each with its own database, JetStream between them (issue 15): group A
(orders, inventory) on the session's database, group B (payments, notifications; two replicas)
on database B, `switchboard serve` processes with SWITCHBOARD_NATS_URL set. Orders placed on A
are charged on B, and their outcomes come back to A and to B's notifications."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import nats
import pytest

from app.broker.stream import STREAM
from tests.scale.conftest import Cluster, Server, call, order_body, wait_for

A_MODULES = "orders,inventory"
B_MODULES = "payments,notifications"
# payment method -> the order's final status (modules/payments/gateway.py)
OUTCOMES = {
    "pm_card_ok": "paid",
    "pm_card_declined": "payment_declined",
    "pm_card_flaky": "paid",  # two errors, then captured: retried through JetStream's nak
    "pm_card_broken": "payment_failed",  # always errors: parked in B's dead letters, compensated
}
KIND = {"paid": "payment_captured", "payment_declined": "payment_declined", "payment_failed": "payment_failed"}
STOCK = 100
WAIT = 60.0


@pytest.fixture
async def js(nats_cluster) -> AsyncIterator:
    nc = await nats.connect(nats_cluster.urls)
    yield nc.jetstream()
    await nc.close()


async def start_groups(cluster: Cluster, nats_cluster, database_url_b: str) -> tuple[Server, list[Server]]:
    broker = {"SWITCHBOARD_NATS_URL": ",".join(nats_cluster.urls)}
    a = await cluster.start("a", modules=A_MODULES, env=broker)
    b = await cluster.start_many(["b1", "b2"], modules=B_MODULES, env={**broker, "DATABASE_URL": database_url_b})
    return a, b


async def settled(js) -> bool:
    """Every durable consumer of the stream has nothing pending and nothing unacknowledged."""
    consumers = await js.consumers_info(STREAM)
    return bool(consumers) and all(c.num_pending == 0 and c.num_ack_pending == 0 for c in consumers)


async def place_orders(cluster: Cluster, a: Server, per_method: int) -> dict[str, str]:
    """order id -> the status it must reach."""
    expected = {}
    for method, final in OUTCOMES.items():
        for i in range(per_method):
            status, _, body = await call(cluster.http, "POST", f"{a.url}/orders",
                                         json_body=order_body("widget", 1, method, customer=f"c-{i}"))  # fmt: skip
            assert status == 201, body
            expected[body["order_id"]] = final
    return expected


async def statuses(cluster: Cluster, a: Server, order_ids) -> dict[str, str | None]:
    found = {}
    for order_id in order_ids:
        status, _, body = await call(cluster.http, "GET", f"{a.url}/orders/{order_id}")
        found[order_id] = body["status"] if status == 200 else None
    return found


async def test_orders_on_a_are_charged_and_notified_on_b_through_jetstream(
    nats_cluster, cluster, js, db, clean_b, database_url_b
):
    a, _ = await start_groups(cluster, nats_cluster, database_url_b)
    status, _, body = await call(cluster.http, "POST", f"{a.url}/inventory/items", json_body={"sku": "widget", "quantity": STOCK})
    assert status == 201, body

    expected = await place_orders(cluster, a, per_method=3)

    async def final() -> bool:
        return await statuses(cluster, a, expected) == expected

    await wait_for(final, WAIT, "every order at its final status on A")
    # the stock follows on A: paid orders' holds committed, the others' released
    paid = sum(1 for s in expected.values() if s == "paid")

    async def stock_settled() -> bool:
        status, _, level = await call(cluster.http, "GET", f"{a.url}/inventory/items/widget")
        return status == 200 and level["available"] == STOCK - paid and level["reserved"] == 0

    await wait_for(stock_settled, WAIT, f"widget at {STOCK - paid} available, 0 reserved")
    await wait_for(lambda: settled(js), WAIT, "every JetStream consumer with nothing pending or unacknowledged")

    # each notification exactly once, of the order's outcome, on B
    sent = await clean_b.fetch("SELECT order_id::text AS order_id, kind FROM notifications_sent")
    assert Counter(r["order_id"] for r in sent) == Counter(list(expected))
    assert {r["order_id"]: r["kind"] for r in sent} == {o: KIND[s] for o, s in expected.items()}
    # B's own dead letters hold the broken cards' charges, compensated; A has none
    letters = await clean_b.fetch("SELECT subscriber, status FROM dead_letters")
    assert Counter((r["subscriber"], r["status"]) for r in letters) == {("payments.charge_order", "parked"): 3}
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0

    # each database holds its own modules' data only
    assert await db.fetchval("SELECT count(*) FROM notifications_sent") == 0
    assert await db.fetchval("SELECT count(*) FROM events WHERE type LIKE 'payments.%'") == 0
    assert await db.fetchval("SELECT count(*) FROM orders_view") == len(expected)
    for table in ("orders_view", "orders_idempotency", "inventory_reservations"):
        assert await clean_b.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    assert await clean_b.fetchval("SELECT count(*) FROM events WHERE type LIKE 'orders.%' OR type LIKE 'inventory.%'") == 0
    # one payment stream per order, on B
    assert await clean_b.fetchval("SELECT count(DISTINCT stream_id) FROM events WHERE type LIKE 'payments.%'") == len(expected)

    # nothing left in either outbox; what crossed went through the publisher's rows
    for side in (db, clean_b):  # ('dead': the rows of B's dead letters, above)
        assert await side.fetchval("SELECT count(*) FROM outbox WHERE status NOT IN ('delivered', 'dead')") == 0
        subscribers = {r["subscriber"] for r in await side.fetch("SELECT DISTINCT subscriber FROM outbox")}
        assert "broker.publish" in subscribers
    assert await clean_b.fetchval("SELECT count(*) FROM outbox WHERE status = 'dead'") == 3
    assert not {r["subscriber"] for r in await db.fetch("SELECT DISTINCT subscriber FROM outbox")} & {
        "payments.charge_order", "notifications.notify_customer"}  # fmt: skip
    assert not {r["subscriber"] for r in await clean_b.fetch("SELECT DISTINCT subscriber FROM outbox")} & {
        "orders.mark_order_paid", "inventory.commit_reservation", "inventory.release_reservation"}  # fmt: skip
