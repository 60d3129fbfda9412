"""A pool with no connection free is the database's unavailability, not the waiting module's
timeout (issue 12): inside a mediator call the wait ends just before the deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app.db import Database
from app.mediator import Mediator
from app.messages import Command, DatabaseUnavailable


class Count(Command):
    """A test command that reads the database."""


@pytest.fixture
async def tiny(database_url: str) -> AsyncIterator[Database]:
    database = await Database(database_url, min_size=1, max_size=1).connect()
    yield database
    await database.close()


def through_mediator(db: Database, how: str) -> Mediator:
    async def count(message: Count) -> int:
        if how == "async with":
            async with db.acquire() as conn:
                return await conn.fetchval("SELECT 1")
        conn = await db.pool.acquire()  # as UnitOfWork does
        try:
            return await conn.fetchval("SELECT 1")
        finally:
            await db.pool.release(conn)

    return Mediator({Count: ("target", count)}, default_timeout=0.3, breaker_fail_max=2)


@pytest.mark.parametrize("how", ["async with", "await"])
async def test_a_call_waiting_for_a_connection_of_a_full_pool_is_database_unavailable_and_trips_no_breaker(
    tiny: Database, how: str
):
    m = through_mediator(tiny, how)
    held = await tiny.pool.acquire()  # the pool's only connection
    try:
        for _ in range(3):
            with pytest.raises(DatabaseUnavailable, match="PoolExhausted"):
                await asyncio.wait_for(m.send(Count()), 5)
        assert m.open_breakers() == {}
    finally:
        await tiny.pool.release(held)

    assert await m.send(Count()) == 1


async def test_outside_a_mediator_call_the_wait_for_a_connection_is_not_bounded(tiny: Database):
    held = await tiny.pool.acquire()
    waiting = asyncio.create_task(tiny.fetchval("SELECT 1"))
    try:
        done, _ = await asyncio.wait([waiting], timeout=0.3)
        assert not done  # still waiting (the relay's and registry's behaviour is unchanged)
    finally:
        await tiny.pool.release(held)
    assert await asyncio.wait_for(waiting, 5) == 1


async def test_a_call_waiting_for_a_connection_of_a_pool_that_has_one_free_runs(tiny: Database):
    m = through_mediator(tiny, "async with")

    assert await m.send(Count()) == 1
