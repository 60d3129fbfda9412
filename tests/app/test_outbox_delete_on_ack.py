"""With no outbox retention (SWITCHBOARD_OUTBOX_RETENTION=0) the acknowledgement deletes the row
instead of marking it delivered: nothing is left behind, and every guarantee still holds --
applied once, in key order, only by the relay holding the lease."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from app.relay.ack import acknowledge
from app.wiring import Envelope, Subscription
from tests.app.relay_worker import (
    SUBSCRIBER,
    TestEvent,
    append,
    applied,
    build_system,
    deliver_everything,
    recorder,
    relay_for,
    run_relays_until_settled,
)

pytestmark = pytest.mark.usefixtures("effects")


@pytest.fixture
def no_retention(settings):
    return replace(settings, outbox_retention_seconds=0)


async def test_with_no_retention_delivered_rows_are_deleted_and_applied_once(db, no_retention):
    relay = relay_for(no_retention, db, Subscription(SUBSCRIBER, recorder()))
    await append(relay.system, 3, 4)

    await deliver_everything(relay)

    assert await db.fetchval("SELECT count(*) FROM outbox") == 0
    assert await applied(db) == {
        key: [1, 2, 3, 4] for key in ("ticker-00000", "ticker-00001", "ticker-00002")
    }
    assert (
        await db.fetchval("SELECT count(*) FROM inbox WHERE subscriber = $1", SUBSCRIBER) == 0
    )  # no inbox row per outbox delivery (app/relay/ack.py)


async def test_with_no_retention_a_retried_row_is_deleted_once_it_succeeds(db, no_retention):
    failed: set[int] = set()

    def fail_first_attempt_of_seq_2(event: TestEvent, envelope: Envelope) -> None:
        if event.seq == 2 and envelope.attempt == 1:
            failed.add(event.seq)
            raise RuntimeError("first attempt fails")

    relay = relay_for(no_retention, db, Subscription(SUBSCRIBER, recorder(fail_first_attempt_of_seq_2)))
    await append(relay.system, 1, 3)

    await deliver_everything(relay)

    assert failed == {2}
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0
    assert await applied(db) == {"ticker-00000": [1, 2, 3]}


async def test_a_delete_acknowledgement_leaves_a_row_another_relay_took_over(db, no_retention):
    relay = relay_for(no_retention, db, Subscription(SUBSCRIBER, recorder()))
    await append(relay.system, 1, 1)
    batch = await relay._claims.claim()
    batch.keeper.cancel()
    await db.execute("UPDATE outbox SET locked_by = 'relay-other' WHERE id = ANY($1::bigint[])", batch.ids)

    async with db.acquire() as conn, conn.transaction():
        acknowledged = await acknowledge(conn, batch.ids, relay.instance_id, delete=True)

    assert acknowledged == 0
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'pending'") == 1


async def test_with_no_retention_the_purge_still_removes_rows_delivered_while_rows_were_kept(
    db, settings, no_retention
):
    keeping = relay_for(
        replace(settings, outbox_retention_seconds=3600), db, Subscription(SUBSCRIBER, recorder())
    )
    await append(keeping.system, 2, 2)
    await deliver_everything(keeping)
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'delivered'") == 4

    purged = await relay_for(no_retention, db, Subscription(SUBSCRIBER, recorder())).purge_delivered()

    assert purged == 4
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0


async def test_three_relays_deleting_on_ack_apply_every_row_once_and_in_key_order(db, no_retention):
    keys, events = 300, 5
    rng = random.Random(20261129)

    def flaky(event: TestEvent, envelope: Envelope) -> None:
        if rng.random() < 0.1:  # after the effect was written: the rollback must take it away
            raise RuntimeError(f"{event.key} #{event.seq} attempt {envelope.attempt}")

    settings = replace(no_retention, relay_batch_size=100, retry_max_attempts=10)
    subscriptions = [Subscription(SUBSCRIBER, recorder(flaky))]
    await append(build_system(settings, db, subscriptions), keys, events)
    relays = await run_relays_until_settled(
        db, lambda pool: build_system(settings, pool, subscriptions), pool_size=6, concurrency=6, seconds=60
    )

    effects = await db.fetch("SELECT message_id FROM relay_test_effects")
    applied_ids = [r["message_id"] for r in effects]
    assert len(applied_ids) == len(set(applied_ids))  # nothing applied twice
    parked = await db.fetchval("SELECT count(*) FROM outbox WHERE status IN ('dead', 'blocked')")
    assert len(applied_ids) + parked == keys * events  # nothing lost
    assert await db.fetchval("SELECT count(*) FROM outbox") == parked  # the delivered rows are gone
    for key, seqs in (await applied(db)).items():
        assert seqs == list(range(1, len(seqs) + 1)), key  # in order, a prefix of the stream
    assert all(relay.delivered > 0 for relay in relays)
    assert sum(relay.delivered for relay in relays) == len(applied_ids)
