"""Compensation across a relay crash: the relay charging a broken card is SIGKILLed inside its
third attempt; another relay takes the row over once the lease lapses, spends the last attempts,
parks the charge and compensates it. The order still ends payment_failed, once."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import UUID

import pytest

from app.relay import Relay
from modules.inventory.commands import AddStock
from modules.inventory.queries import GetStockLevel
from modules.orders.commands import OrderLine, PlaceOrder
from modules.orders.queries import GetOrder
from modules.payments.gateway import fake_provider
from tests.app.relay_worker import wait_until

ROOT = Path(__file__).resolve().parents[1]
CHARGE = "payments.charge_order"


@pytest.fixture
async def charge_worker(database_url) -> AsyncIterator:
    """`await charge_worker()` starts `relay_worker charge` (a relay over every module whose
    provider hangs in the third charge). Whatever is still running at the end is killed."""
    processes = []

    async def start() -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.app.relay_worker",
            "charge",
            "worker-1",
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": database_url},
            stdout=asyncio.subprocess.PIPE,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def lines_until(process: asyncio.subprocess.Process, last: str) -> list[str]:
    lines: list[str] = []
    async with asyncio.timeout(30):
        while not lines or lines[-1] != last:
            line = await process.stdout.readline()
            assert line, f"the worker exited after {lines}"
            lines.append(line.decode().strip())
    return lines


async def test_a_relay_killed_mid_charge_still_ends_the_order_payment_failed_once(system, db, charge_worker):
    await system.mediator.send(AddStock(sku="widget", quantity=5))
    accepted = await system.mediator.send(
        PlaceOrder(customer_id="c-1", lines=(OrderLine(sku="widget", quantity=2),), payment_method="pm_card_broken")
    )
    order_id: UUID = accepted.order_id
    process = await charge_worker()

    assert await lines_until(process, "charge 3") == ["charge 1", "charge 2", "charge 3"]
    process.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
    held = await db.fetchrow("SELECT attempts, locked_by, status FROM outbox WHERE subscriber = $1", CHARGE)
    assert tuple(held) == (3, "worker-1", "pending")  # killed mid-attempt: the row is still leased

    relay = Relay(system, instance_id="relay-2")

    async def ended() -> bool:
        await relay.drain()
        undelivered = await db.fetchval("SELECT count(*) FROM outbox WHERE status NOT IN ('delivered', 'dead')")
        return undelivered == 0 and await db.fetchval("SELECT count(*) FROM dead_letters") == 1

    await wait_until(ended, 30, "the second relay to park and compensate the charge")

    order = await system.mediator.ask(GetOrder(order_id=order_id))
    assert order.status == "payment_failed"
    stock = await system.mediator.ask(GetStockLevel(sku="widget"))
    assert (stock.available, stock.reserved) == (5, 0)  # the hold went back
    assert await db.fetchval("SELECT count(*) FROM notifications_sent WHERE order_id = $1", order_id) == 1
    [letter] = await db.fetch("SELECT attempts, status, compensation, error_type FROM dead_letters")
    assert tuple(letter) == (5, "parked", "compensated", "CardProcessingError")
    assert fake_provider.calls[order_id] == 2  # attempts 4 and 5 here; 1-3 in the killed relay
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'payments.PaymentFailed'") == 1
