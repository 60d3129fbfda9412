"""Inbox retention: old inbox rows go once no outbox row can deliver their message again; a
message that can still come again (a dead letter, a retry) keeps its row whatever its age, so a
redelivery is never applied twice."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.messages import PermanentError
from app.relay import Relay
from app.relay import dead_letters as operations
from app.wiring import Envelope, Subscription
from tests.app.relay_worker import (
    SUBSCRIBER,
    TestEvent,
    append,
    build_system,
    deliver_everything,
    recorder,
    relay_for,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("effects")


async def age_inbox(db, seconds: float, message_ids=None) -> None:
    await db.execute(
        "UPDATE inbox SET processed_at = processed_at - make_interval(secs => $1)"
        " WHERE $2::uuid[] IS NULL OR message_id = ANY($2::uuid[])",
        seconds,
        message_ids,
    )


async def effects_of(db, message_id) -> int:
    return await db.fetchval("SELECT count(*) FROM relay_test_effects WHERE message_id = $1", message_id)


def failing_on_attempt(attempt: int, error: type[Exception]):
    def fail(event: TestEvent, envelope: Envelope) -> None:
        if envelope.attempt == attempt:
            raise error(f"attempt {attempt} fails")

    return fail


async def applied_by_a_stale_relay(settings, db, taker_fails_with: type[Exception]) -> tuple[Relay, object]:
    """Relay A claims a message and stalls until its lease lapses; relay B takes it over and its
    attempt fails (a retry, or a dead letter); then A wakes up and applies it. Its
    acknowledgement finds the row no longer its own, so today its transaction rolls back
    (app/relay/ack.py); a relay before that rule committed the effect and the inbox row anyway,
    and such rows may still be in a database: they are written here as that relay left them.
    Left behind: an undelivered outbox row whose message has an inbox row and one effect.
    Returns a third relay and the message id."""
    system = build_system(replace(settings, inbox_retention_seconds=60.0), db,
                          [Subscription(SUBSCRIBER, recorder(failing_on_attempt(2, taker_fails_with)))])
    stale, taker = Relay(system, instance_id="relay-a"), Relay(system, instance_id="relay-b")
    await append(system, 1, 1)
    batch = await stale._claim()
    await db.execute("UPDATE outbox SET locked_until = now() - interval '1 s'")  # A's lease lapses
    assert await taker.run_once() == 1
    await stale._deliver_batch(batch)

    message_id = await db.fetchval("SELECT message_id FROM outbox WHERE status <> 'delivered'")
    assert await effects_of(db, message_id) == 0  # the stalled relay committed nothing
    await db.execute(
        "INSERT INTO relay_test_effects (subscriber, message_id, key, seq, attempt) VALUES ($1, $2, 'k', 1, 1)",
        SUBSCRIBER, message_id,
    )  # fmt: skip
    await db.execute("INSERT INTO inbox (subscriber, message_id) VALUES ($1, $2)", SUBSCRIBER, message_id)
    assert await effects_of(db, message_id) == 1
    assert await db.fetchval("SELECT count(*) FROM inbox WHERE message_id = $1", message_id) == 1
    return Relay(system, instance_id="relay-c"), message_id


@pytest.mark.outbox_retention(3600)  # reads delivered rows
async def test_inbox_rows_past_the_retention_whose_messages_are_delivered_go_in_batches_and_fresh_ones_stay(
    db, settings, monkeypatch
):
    import app.relay

    monkeypatch.setattr(app.relay, "PURGE_BATCH", 4)
    relay = relay_for(replace(settings, inbox_retention_seconds=60.0), db, Subscription(SUBSCRIBER, recorder()))
    await append(relay.system, 13, 1)
    await relay.drain()
    # inbox rows as relays before the lease-checked acknowledgement wrote them (outbox deliveries
    # write none now; deliveries from outside the database will)
    await db.execute("INSERT INTO inbox (subscriber, message_id) SELECT subscriber, message_id FROM outbox")
    old = [r["message_id"] for r in await db.fetch("SELECT message_id FROM inbox ORDER BY message_id LIMIT 10")]
    await age_inbox(db, 61.0, old)

    assert await relay.purge_inbox(rounds=2) == 8  # two batches of 4, then it stops for now
    assert await relay.purge_inbox() == 2

    left = {r["message_id"] for r in await db.fetch("SELECT message_id FROM inbox")}
    assert len(left) == 3 and not left & set(old)
    assert await db.fetchval("SELECT count(*) FROM outbox") == 13  # the outbox has its own retention


async def test_an_old_inbox_row_stays_while_its_message_waits_for_a_retry(db, settings):
    relay, message_id = await applied_by_a_stale_relay(settings, db, RuntimeError)
    await db.execute("UPDATE outbox SET available_at = now() + interval '1 h'")  # a long backoff
    await age_inbox(db, 3600.0)

    assert await relay.purge_inbox() == 0

    await db.execute("UPDATE outbox SET available_at = now()")
    await deliver_everything(relay)
    assert await effects_of(db, message_id) == 1  # the retry is acknowledged, not applied again


@pytest.mark.outbox_retention(3600)  # reads delivered rows
async def test_a_dead_letter_replayed_after_the_purge_is_not_applied_twice(db, settings):
    relay, message_id = await applied_by_a_stale_relay(settings, db, PermanentError)
    await age_inbox(db, 86400.0)  # parked for a day: far past the inbox retention

    assert await relay.purge_inbox() == 0  # its message can still be delivered: the row stays
    [letter] = await operations.parked_ids(db)
    assert await operations.replay(db, [letter], "ops") == [letter]
    await deliver_everything(relay)

    assert await db.fetchval("SELECT status FROM outbox WHERE message_id = $1", message_id) == "delivered"
    assert await effects_of(db, message_id) == 1  # acknowledged without running the handler again
    await age_inbox(db, 61.0)
    assert await relay.purge_inbox() == 1  # delivered for good: now its inbox row may go


@pytest.mark.outbox_retention(3600)  # reads delivered rows
async def test_a_relay_whose_lease_lapsed_applies_nothing_twice_after_a_purge_within_the_retention(
    db, settings
):
    system = build_system(replace(settings, inbox_retention_seconds=60.0), db)
    stale, taker = Relay(system, instance_id="relay-a"), Relay(system, instance_id="relay-b")
    await append(system, 1, 1)
    batch = await stale._claim()
    await db.execute("UPDATE outbox SET locked_until = now() - interval '1 s'")
    assert await taker.run_once() == 1
    message_id = await db.fetchval("SELECT message_id FROM outbox")

    assert await taker.purge_inbox() == 0  # delivered, but younger than the retention
    await stale._deliver_batch(batch)

    assert await effects_of(db, message_id) == 1


async def test_a_running_relay_purges_old_inbox_rows_on_its_own(db, settings):
    settings = replace(settings, inbox_retention_seconds=0.0, outbox_retention_seconds=0.0)
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder()))
    await append(relay.system, 5, 2)
    await db.execute("INSERT INTO inbox (subscriber, message_id) SELECT subscriber, message_id FROM outbox")
    relay.start()
    try:

        async def both_empty() -> bool:
            rows = await db.fetchval("SELECT (SELECT count(*) FROM inbox) + (SELECT count(*) FROM outbox)")
            return rows == 0 and await db.fetchval("SELECT count(*) FROM relay_test_effects") == 10

        await wait_until(both_empty, 10.0, "the relay to purge its delivered rows and inbox rows")
    finally:
        await relay.stop()
