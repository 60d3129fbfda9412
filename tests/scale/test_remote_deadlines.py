"""Issue 12, finding 5: a remote call carries its caller's deadline as an absolute time, so an
inventory paused past it does not run, on resuming, the reservation its caller already answered
with 503 (an orphan hold). And GetStockLevel, asked from another process while inventory's
process is down, answers the last level that process saw, marked stale."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from dataclasses import replace

import pytest

from app.bootstrap import bootstrap
from app.deadlines import DEADLINE_MARGIN
from app.messages import Unavailable
from app.remote import DEADLINE_AT_HEADER, DEADLINE_HEADER
from app.settings import Settings
from modules.inventory.queries import GetStockLevel, StockLevelView

from .conftest import INTERNAL_TOKEN, TIMEOUT, Cluster, Server, call, order_body
from .test_split_deployment import A_MODULES, SLACK, place, split, stock, wait_stock


async def reserve_calls(cluster: Cluster, server: Server) -> dict[str, float]:
    """switchboard_mediator_calls_total for inventory's ReserveStock on `server`, by outcome."""
    status, _, text = await call(cluster.http, "GET", f"{server.url}/metrics")
    assert status == 200
    prefix = 'switchboard_mediator_calls_total{message="ReserveStock",module="inventory",outcome="'
    return {
        line[len(prefix) :].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


async def test_a_reservation_reaching_a_paused_inventory_after_its_caller_gave_up_is_not_run(cluster: Cluster, db):
    """A pauses B's process (SIGSTOP) mid-call: A answers 503 at its deadline. A request that B
    reads only after the deadline — here the same ReserveStock sent with A's deadline headers on a
    connection that stays open, as behind a proxy or from a caller too busy to close it — must
    not run when B resumes: no hold for that order, stock unchanged."""
    a, b = await split(cluster, SWITCHBOARD_HEARTBEAT="10")  # B stays registered while it is paused
    status, _, _ = await call(cluster.http, "POST", f"{b.url}/inventory/items", json_body={"sku": "lamp", "quantity": 10})
    assert status == 201
    status, _, paid, _ = await place(cluster, a, order_body("lamp", 1, "pm_card_ok"))
    assert status == 201, paid
    await wait_stock(cluster, b, "lamp", available=9, reserved=0)  # the first order's hold is settled
    holds = await db.fetch("SELECT order_id, status FROM inventory_reservations ORDER BY order_id")
    before = await reserve_calls(cluster, b)
    late_order = uuid.uuid4()

    b.signal(signal.SIGSTOP)
    try:
        budget = TIMEOUT - DEADLINE_MARGIN  # what A's PlaceOrder leaves its ReserveStock
        late = asyncio.create_task(
            call(
                cluster.http,
                "POST",
                f"{b.url}/internal/messages/inventory.ReserveStock",
                json_body={"order_id": str(late_order), "lines": [{"sku": "lamp", "quantity": 1}]},
                headers={
                    "Authorization": f"Bearer {INTERNAL_TOKEN}",
                    DEADLINE_HEADER: f"{budget:.3f}",
                    DEADLINE_AT_HEADER: f"{time.time() + budget:.3f}",
                },
                timeout=30,
            )
        )
        status, _, problem, seconds = await place(cluster, a, order_body("lamp", 1, "pm_card_ok"))
        assert status == 503 and seconds <= TIMEOUT + SLACK, (status, seconds, problem)
    finally:
        b.signal(signal.SIGCONT)  # after A's deadline: A has answered its client

    status, _, problem = await asyncio.wait_for(late, 15)
    assert status == 503 and problem["code"] == "Unavailable" and "not run" in problem["detail"], problem
    after = await reserve_calls(cluster, b)
    assert after.get("ok") == before.get("ok") and after["unavailable"] == before.get("unavailable", 0) + 1, after
    assert await db.fetchval("SELECT count(*) FROM inventory_reservations WHERE order_id = $1", late_order) == 0
    assert await db.fetch("SELECT order_id, status FROM inventory_reservations ORDER BY order_id") == holds
    assert await stock(cluster, b, "lamp") == {"sku": "lamp", "available": 9, "reserved": 0}


async def test_a_stock_level_asked_from_another_process_while_inventory_is_down_is_the_last_one_seen_marked_stale(
    cluster: Cluster, db, base_settings: Settings
):
    """The caller here is the test process itself, booted like process A (orders, payments,
    notifications; inventory reached over HTTP through the registry): A serves no inventory route."""
    b = await cluster.start("B-inventory", modules="inventory")
    status, _, _ = await call(cluster.http, "POST", f"{b.url}/inventory/items", json_body={"sku": "lamp", "quantity": 4})
    assert status == 201
    settings = replace(base_settings, modules=tuple(A_MODULES.split(",")), internal_token=INTERNAL_TOKEN, default_timeout=TIMEOUT)
    caller = bootstrap(settings, db)
    await caller.transport.start()
    try:
        assert await caller.mediator.ask(GetStockLevel(sku="lamp")) == StockLevelView(sku="lamp", available=4, reserved=0)

        b.kill()
        answer = await asyncio.wait_for(caller.mediator.ask(GetStockLevel(sku="lamp")), TIMEOUT + SLACK)

        assert answer == StockLevelView(sku="lamp", available=4, reserved=0, stale=True)
        with pytest.raises(Unavailable):  # never seen here: nothing to fall back on
            await caller.mediator.ask(GetStockLevel(sku="desk"))
    finally:
        await caller.transport.close()
