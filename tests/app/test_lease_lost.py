"""A relay that stalled past its lease commits nothing: the acknowledgement must find every row
of its transaction still leased to it, or the transaction rolls back (app/relay/ack.py). So an
effect never commits without its acknowledgement, and the inbox's retention cannot open a window
for a double apply."""

from __future__ import annotations

import pytest

from app.relay import Relay
from app.wiring import Subscription
from tests.app.relay_worker import SUBSCRIBER, append, build_system, recorder

pytestmark = pytest.mark.usefixtures("effects")


async def effects(db) -> int:
    return await db.fetchval("SELECT count(*) FROM relay_test_effects")


async def test_a_stalled_relay_whose_rows_were_delivered_and_purged_applies_nothing(db, settings):
    system = build_system(settings, db, [Subscription(SUBSCRIBER, recorder())])
    stale, taker = Relay(system, instance_id="relay-a"), Relay(system, instance_id="relay-b")
    await append(system, 2, 1)
    batch = await stale._claim()
    await db.execute("UPDATE outbox SET locked_until = now() - interval '1 s'")  # A stalls: leases lapse
    assert await taker.run_once() == 2
    assert await effects(db) == 2
    # an hour later: delivered rows and their inbox rows are gone (retention)
    await db.execute("DELETE FROM inbox")
    await db.execute("DELETE FROM outbox")

    await stale._deliver_batch(batch)  # A wakes up with the rows in memory

    assert await effects(db) == 2
    assert await db.fetchval("SELECT count(*) FROM inbox") == 0


async def test_a_stalled_relay_that_lost_one_row_of_two_commits_neither(db, settings):
    system = build_system(settings, db, [Subscription(SUBSCRIBER, recorder())])
    stale = Relay(system, instance_id="relay-a")
    await append(system, 2, 1)
    batch = await stale._claim()
    taken = min(batch.ids)
    await db.execute("UPDATE outbox SET locked_by = 'relay-b' WHERE id = $1", taken)  # B took one over

    await stale._deliver_batch(batch)

    assert await effects(db) == 0  # the row A still held is not applied without the other's rollback
    kept = max(batch.ids)
    assert await db.fetchval("SELECT status FROM outbox WHERE id = $1", kept) == "pending"
    assert await db.fetchval("SELECT locked_by FROM outbox WHERE id = $1", kept) is None  # handed back
    assert await db.fetchval("SELECT attempts FROM outbox WHERE id = $1", kept) == 0  # no attempt spent
