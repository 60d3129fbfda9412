"""The event store's functions over a bare connection, as the unit of work and the relay's fast
run call them: append (events, outbox rows, staged rows in one statement), load and replay."""

from __future__ import annotations

import pytest

from app.eventstore import append, load_sql, replay
from app.messages import ConcurrencyError
from app.staging import merged, stage_entry
from tests.app.relay_worker import SUBSCRIBER, Ticker, build_system

pytestmark = pytest.mark.usefixtures("effects")

EFFECT_COLUMNS = {"subscriber": "text", "message_id": "uuid", "key": "text", "seq": "int", "attempt": "int"}


async def test_append_writes_the_events_their_outbox_rows_and_the_staged_rows_in_one_statement(settings, db):
    system = build_system(settings, db)
    ticker = Ticker("00001")
    ticker.tick(2)
    effect = ("someone", "00000000-0000-0000-0000-000000000001", "k", 1, 1)
    staged = merged([stage_entry("relay_test_effects", EFFECT_COLUMNS, [effect])])
    positions: list[int] = []

    async with db.acquire() as conn, conn.transaction():
        outbox_rows = await append(conn, system.catalog, [ticker], staged, positions)

    assert outbox_rows == 2
    assert positions == sorted(positions) and len(positions) == 2
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE subscriber = $1", SUBSCRIBER) == 2
    assert await db.fetchval("SELECT count(*) FROM relay_test_effects WHERE subscriber = 'someone'") == 1


async def test_a_loaded_stream_replays_into_its_aggregate_and_an_empty_one_into_none(settings, db):
    system = build_system(settings, db)
    ticker = Ticker("00002")
    ticker.tick(3)
    async with db.acquire() as conn, conn.transaction():
        await append(conn, system.catalog, [ticker], [], [])

    async with db.acquire() as conn:
        loaded = replay(system.catalog, Ticker, "00002", await conn.fetch(load_sql(Ticker), ticker.stream_id))
        missing = replay(system.catalog, Ticker, "00003", await conn.fetch(load_sql(Ticker), "ticker-00003"))

    assert loaded is not None and loaded.version == 3 and loaded.pending_events == []
    assert missing is None


async def test_appending_to_a_stream_changed_since_it_was_loaded_raises_a_concurrency_error(settings, db):
    system = build_system(settings, db)
    first, second = Ticker("00004"), Ticker("00004")  # both decide on the same (empty) stream
    first.tick()
    second.tick()
    async with db.acquire() as conn, conn.transaction():
        await append(conn, system.catalog, [first], [], [])

    with pytest.raises(ConcurrencyError):
        async with db.acquire() as conn, conn.transaction():
            await append(conn, system.catalog, [second], [], [])
