"""A relay process killed with SIGKILL: another relay delivers its rows once the lease lapses,
and what the dead one had committed is not applied again."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.relay import Relay
from tests.app.relay_worker import append, applied, build_system, wait_until

ROOT = Path(__file__).resolve().parents[2]
KEYS, EVENTS = 4, 3


pytestmark = [pytest.mark.usefixtures("effects"), pytest.mark.outbox_retention(3600)]  # they read delivered rows


@pytest.fixture
async def worker(database_url) -> AsyncIterator:
    """`await worker(mode)` starts `relay_worker` and returns it with the first line it printed.
    Whatever is still running at the end of the test is killed."""
    processes = []

    async def start(mode: str) -> tuple[asyncio.subprocess.Process, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.app.relay_worker",
            mode,
            "worker-1",
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": database_url},
            stdout=asyncio.subprocess.PIPE,
        )
        processes.append(process)
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        return process, line.decode().strip()

    yield start
    for process in processes:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def kill(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL


async def held_by_worker(db) -> list:
    return await db.fetch("SELECT id FROM outbox WHERE status = 'pending' AND locked_by = 'worker-1'")


async def deliver_with_second_relay(system) -> None:
    relay = Relay(system, instance_id="relay-2")
    relay.start()
    try:
        await wait_until(
            lambda: system.db.fetchval("SELECT count(*) = 0 FROM outbox WHERE status <> 'delivered'"), 20, "the second relay to deliver"
        )
    finally:
        await relay.stop()


async def test_a_relay_killed_inside_a_handler_leaves_its_rows_to_the_next_relay_after_the_lease(
    db, settings, worker
):
    system = build_system(settings, db)
    keys = await append(system, KEYS, EVENTS)
    process, line = await worker("handler")
    assert line == "claimed"

    await kill(process)
    assert len(await held_by_worker(db)) == KEYS  # mid-batch: the dead relay still holds them
    await deliver_with_second_relay(system)

    # the first events came from the dead relay, the rest from the second; the effects the
    # dead one wrote inside its hung handlers were never committed
    assert await applied(db) == {key: [1, 2, 3] for key in keys}


async def test_a_relay_killed_after_its_handlers_ran_but_before_committing_leaves_nothing_applied(
    db, settings, worker
):
    system = build_system(settings, db)
    keys = await append(system, KEYS, EVENTS)
    process, line = await worker("settle")
    assert line == "applied"

    await kill(process)
    assert len(await held_by_worker(db)) == KEYS
    assert await applied(db) == {}  # handlers ran, but effects and acknowledgement commit together
    await deliver_with_second_relay(system)

    assert await applied(db) == {key: [1, 2, 3] for key in keys}
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'delivered'") == KEYS * EVENTS
    assert await db.fetchval("SELECT count(*) FROM inbox") == 0  # the effects commit with their acks
