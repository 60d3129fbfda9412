"""The sustained criterion's rows per order come from the modules' subscriptions."""

from __future__ import annotations

import asyncio

import asyncpg

from app.messages import Event
from app.wiring import Module, Subscription
from bench import env
from bench.p1 import _delivered
from bench.sustained import rows_per_order


class Placed(Event, tag="shop.Placed"):
    pass


class Paid(Event, tag="shop.Paid"):
    pass


class Refunded(Event, tag="shop.Refunded"):
    pass


async def _noop(event) -> None:
    return None


def test_rows_per_order_counts_one_row_per_subscriber_of_each_happy_path_event():
    modules = [
        Module(name="a", subscriptions={Placed: [Subscription("a.x", _noop), Subscription("a.y", _noop)]}),
        Module(
            name="b",
            subscriptions={Paid: [Subscription("b.z", _noop)], Refunded: [Subscription("b.r", _noop)]},
        ),
    ]

    assert rows_per_order(modules, events=("shop.Placed", "shop.Paid")) == 3


async def test_a_sustained_step_waits_for_the_outbox_on_the_database_not_for_a_quiet_cpu(tmp_path):
    # the CPU rule let a retry start with 22,689 rows undelivered on a saturated machine
    server = await asyncio.to_thread(env.DatabaseServer, tmp_path / "pg", None)
    conn = await asyncpg.connect(server.admin_url)
    try:
        await conn.execute("CREATE TEMP TABLE outbox (status text)")
        await conn.execute("INSERT INTO outbox VALUES ('delivered'), ('dead'), ('blocked')")
        assert await _delivered(conn, limit=30.0) < 5.0  # nothing left that will be delivered

        await conn.execute("INSERT INTO outbox VALUES ('inflight')")
        assert await _delivered(conn, limit=1.0, every=0.05) >= 1.0  # waits while a row is out
    finally:
        await conn.close()
        await server.close()
