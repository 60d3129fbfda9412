"""Three relays with their own pools (as three processes would have) over thousands of rows and
a subscriber that fails at random: nothing is lost, nothing is applied twice, order holds per key."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from app.wiring import Envelope, Subscription
from tests.app.relay_worker import (
    SUBSCRIBER,
    TestEvent,
    append,
    build_system,
    recorder,
    run_relays_until_settled,
)

KEYS, EVENTS = 1000, 5  # 5,000 rows


class Flaky(RuntimeError):
    pass


pytestmark = pytest.mark.usefixtures("effects")


async def test_three_relays_deliver_every_row_once_and_in_key_order_despite_random_failures(db, settings):
    rng = random.Random(20240607)
    failures = 0

    def flaky(event: TestEvent, envelope: Envelope) -> None:
        nonlocal failures
        if rng.random() < 0.2:  # after the effect was written: the rollback must take it away
            failures += 1
            raise Flaky(f"{event.key} #{event.seq} attempt {envelope.attempt}")

    settings = replace(settings, relay_batch_size=250, retry_max_attempts=4)
    subscriptions = [Subscription(SUBSCRIBER, recorder(flaky))]
    await append(build_system(settings, db, subscriptions), KEYS, EVENTS)
    relays = await run_relays_until_settled(
        db, lambda pool: build_system(settings, pool, subscriptions), pool_size=8, concurrency=8, seconds=40
    )

    effects = await db.fetch("SELECT message_id, key, seq FROM relay_test_effects ORDER BY id")
    dead = await db.fetch(
        "SELECT message_id, partition_key, outbox_id FROM dead_letters WHERE status = 'parked'"
    )
    blocked = await db.fetch("SELECT message_id, blocked_by FROM outbox WHERE status = 'blocked'")
    events = await db.fetch("SELECT event_id, stream_id, version FROM events")

    # nothing applied twice, and exactly the applied messages are acknowledged (no inbox rows:
    # an effect commits with its acknowledgement). An acknowledged row is deleted (no outbox
    # retention, the default): the acknowledged messages are the events whose one row is gone.
    applied_ids = [r["message_id"] for r in effects]
    assert len(applied_ids) == len(set(applied_ids))
    left = {r["message_id"] for r in await db.fetch("SELECT message_id FROM outbox")}
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'delivered'") == 0
    assert set(applied_ids) == {r["event_id"] for r in events} - left
    assert await db.fetchval("SELECT count(*) FROM inbox") == 0
    # nothing lost: every event was applied, dead-lettered, or is parked behind its key's dead letter
    dead_ids, blocked_ids = {r["message_id"] for r in dead}, {r["message_id"] for r in blocked}
    assert len(applied_ids) + len(dead_ids) + len(blocked_ids) == len(events) == KEYS * EVENTS
    assert set(applied_ids) | dead_ids | blocked_ids == {r["event_id"] for r in events}
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'dead'") == len(dead)
    # per key: what was applied is a prefix of the stream, applied in order; the dead letter, if
    # any, is the next event, and every later event waits behind it
    applied_by_key: dict[str, list[int]] = {}
    for row in effects:
        applied_by_key.setdefault(row["key"], []).append(row["seq"])
    dead_by_key = {r["partition_key"]: r for r in dead}
    version = {r["event_id"]: (r["stream_id"], r["version"]) for r in events}
    for stream in {r["stream_id"] for r in events}:
        seqs = applied_by_key.get(stream, [])
        assert seqs == list(range(1, len(seqs) + 1)), stream
        if stream in dead_by_key:
            assert version[dead_by_key[stream]["message_id"]] == (stream, len(seqs) + 1)
        else:
            assert len(seqs) == EVENTS, stream
    letter_of = {r["partition_key"]: r for r in await db.fetch("SELECT id, partition_key FROM dead_letters")}
    for row in blocked:
        stream, seq = version[row["message_id"]]
        assert row["blocked_by"] == letter_of[stream]["id"]
        assert seq > len(applied_by_key.get(stream, [])) + 1
    # the run really was contested: retries happened, most rows got through, every relay worked,
    # and no row was acknowledged by two relays
    assert failures > 500
    assert len(applied_ids) > 0.98 * KEYS * EVENTS
    assert all(relay.delivered > 0 for relay in relays)
    assert sum(relay.delivered for relay in relays) == len(applied_ids)
