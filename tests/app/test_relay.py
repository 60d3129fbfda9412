"""The relay against real PostgreSQL: backoff, retries, permanent errors, the inbox, leases,
independent subscribers and a graceful stop."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest

from app.messages import PermanentError
from app.relay import Relay
from app.relay.policy import backoff_delay
from app.wiring import Envelope, Subscription
from tests.app.relay_worker import (
    SUBSCRIBER,
    TestEvent,
    Ticker,
    append,
    applied,
    deliver_everything,
    recorder,
    relay_for,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("effects")



def always(error: Exception):
    def fail(event: TestEvent, envelope: Envelope) -> None:
        raise error

    return fail


def calls(log: list):
    def note(event: TestEvent, envelope: Envelope) -> None:
        log.append((event.key, event.seq, envelope.attempt))

    return note


# -- backoff ------------------------------------------------------------------------------------


def test_backoff_doubles_with_each_attempt_until_the_cap():
    bounds = [backoff_delay(n, base=0.5, cap=10.0, rand=lambda: 1.0) for n in range(1, 8)]

    assert bounds == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_is_jittered_across_the_whole_range_below_its_bound():
    rng = random.Random(7)

    delays = [backoff_delay(4, base=1.0, cap=100.0, rand=rng.random) for _ in range(2000)]

    assert all(0 <= d < 8.0 for d in delays)
    assert min(delays) < 0.5 and max(delays) > 7.5
    assert 3.5 < sum(delays) / len(delays) < 4.5


# -- retries and dead letters -------------------------------------------------------------------


async def test_a_failed_delivery_is_retried_later_with_its_attempt_and_error_recorded(db, settings):
    settings = replace(settings, retry_base_seconds=30.0, retry_cap_seconds=60.0)
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(always(RuntimeError("provider down")))))
    await append(relay.system, 1, 1)

    assert await relay.run_once() == 1

    row = await db.fetchrow(
        "SELECT status, attempts, locked_by, locked_until, last_error, first_failed_at IS NOT NULL AS failed,"
        " available_at > now() AS later, available_at <= now() + interval '30 s' AS within_base FROM outbox"
    )
    assert dict(row) == {
        "status": "pending",
        "attempts": 1,
        "locked_by": None,
        "locked_until": None,
        "last_error": "RuntimeError: provider down",
        "failed": True,
        "later": True,
        "within_base": True,
    }
    assert await applied(db) == {}  # the effect written before the error was rolled back
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0


async def test_a_row_waiting_for_its_retry_holds_back_the_later_rows_of_its_key(db, settings):
    settings = replace(settings, retry_base_seconds=30.0, retry_cap_seconds=60.0)
    failed = []

    def fail_first_once(event: TestEvent, envelope: Envelope) -> None:
        if event.seq == 1 and not failed:
            failed.append(event)
            raise RuntimeError("once")

    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(fail_first_once)))
    [key] = await append(relay.system, 1, 3)
    await relay.drain()
    assert await applied(db) == {}
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE attempts = 0") == 2

    await db.execute("UPDATE outbox SET available_at = now()")  # the backoff is over
    await relay.drain()

    assert await applied(db) == {key: [1, 2, 3]}


async def test_a_row_that_keeps_failing_is_dead_lettered_after_the_maximum_attempts(db, settings):
    settings = replace(settings, retry_max_attempts=3)
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(always(RuntimeError("still down")))))
    await append(relay.system, 1, 1)

    await deliver_everything(relay)

    letter = await db.fetchrow("SELECT attempts, error_type, error_message, status FROM dead_letters")
    assert dict(letter) == {
        "attempts": 3,
        "error_type": "RuntimeError",
        "error_message": "still down",
        "status": "parked",
    }
    assert await db.fetchval("SELECT status FROM outbox") == "dead"


async def test_a_subscriptions_own_maximum_attempts_overrides_the_default(db, settings):
    settings = replace(settings, retry_max_attempts=8)
    fail = recorder(always(RuntimeError("down")))
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, fail, max_attempts=2))
    await append(relay.system, 1, 1)

    await deliver_everything(relay)

    assert await db.fetchval("SELECT attempts FROM dead_letters") == 2


async def test_a_permanent_error_is_dead_lettered_at_once_with_its_error(db, settings):
    seen: list = []

    def reject(event: TestEvent, envelope: Envelope) -> None:
        seen.append(envelope.attempt)
        raise PermanentError("payload can never be handled")

    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(reject)))
    await append(relay.system, 1, 1)
    row = await db.fetchrow("SELECT id, message_id, payload FROM outbox")

    await deliver_everything(relay)

    assert seen == [1]
    letter = await db.fetchrow("SELECT * FROM dead_letters")
    assert letter["outbox_id"] == row["id"] and letter["message_id"] == row["message_id"]
    assert letter["payload"] == row["payload"]
    assert (letter["attempts"], letter["error_type"], letter["error_message"]) == (
        1,
        "PermanentError",
        "payload can never be handled",
    )
    assert "in reject" in letter["error_traceback"]
    assert "PermanentError: payload can never be handled" in letter["error_traceback"]
    assert letter["first_failed_at"] <= letter["last_failed_at"]
    history = await db.fetch(
        "SELECT action, actor FROM dead_letter_history WHERE dead_letter_id = $1", letter["id"]
    )
    assert [tuple(h) for h in history] == [("parked", "relay:relay-test")]


async def test_a_row_whose_relays_keep_dying_is_dead_lettered_without_running_again(db, settings):
    settings = replace(settings, retry_max_attempts=3)
    log: list = []
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(calls(log))))
    await append(relay.system, 1, 1)
    await db.execute(
        "UPDATE outbox SET attempts = 3, locked_by = 'ghost',"
        " locked_until = now() - interval '1 s'"
    )

    await relay.drain()

    assert log == []
    assert await db.fetchval("SELECT error_type FROM dead_letters") == "LeaseExpired"


# -- leases -------------------------------------------------------------------------------------


@pytest.mark.outbox_retention(3600)  # reads delivered rows
async def test_a_row_whose_lease_expired_is_claimed_again_with_the_reason_recorded(db, settings):
    log: list = []
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(calls(log))))
    [key] = await append(relay.system, 1, 1)
    await db.execute("UPDATE outbox SET attempts = 1, locked_by = 'ghost', locked_until = now() - interval '1 s'")

    assert await relay.run_once() == 1

    assert log == [(key, 1, 2)]  # the second attempt
    row = await db.fetchrow("SELECT status, locked_by, attempts, last_error, first_failed_at FROM outbox")
    assert (row["status"], row["locked_by"], row["attempts"]) == ("delivered", None, 2)
    assert row["last_error"].startswith("lease expired: relay ghost")
    assert row["first_failed_at"] is not None


async def test_a_row_whose_lease_has_not_expired_is_not_claimed(db, settings):
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder()))
    await append(relay.system, 1, 1)
    await db.execute("UPDATE outbox SET attempts = 1, locked_by = 'ghost', locked_until = now() + interval '1 min'")

    assert await relay.run_once() == 0
    assert await db.fetchval("SELECT locked_by FROM outbox") == "ghost"


async def test_a_relay_keeps_extending_the_lease_of_a_slow_handler_so_no_other_relay_takes_the_row(
    db, settings
):
    settings = replace(settings, relay_lease_seconds=0.3)
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(event: TestEvent, envelope: Envelope) -> None:
        entered.set()
        await release.wait()

    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(slow)))
    other = Relay(relay.system, instance_id="relay-other")
    await append(relay.system, 1, 1)
    first = asyncio.create_task(relay.run_once())
    await asyncio.wait_for(entered.wait(), 10)
    claimed_until = await db.fetchval("SELECT locked_until FROM outbox")

    # well past the first lease: it was extended, and another relay finds nothing to take
    await wait_until(
        lambda: db.fetchval(
            "SELECT locked_until > $1::timestamptz + interval '0.6 s' FROM outbox", claimed_until
        ),
        5,
        "the lease to be extended",
    )
    assert await other.run_once() == 0
    release.set()
    assert await first == 1

    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0
    assert len(await applied(db)) == 1


async def test_a_relay_that_lost_its_lease_does_not_dead_letter_the_row_another_relay_took_over(db, settings):
    entered, release, overtaken = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def first_attempt_stalls_then_fails(event: TestEvent, envelope: Envelope) -> None:
        if event.seq == 1 and envelope.attempt == 1:
            entered.set()
            await release.wait()
            raise PermanentError("gave up too late")
        await overtaken.wait()  # let the stalled relay settle first

    stalled = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(first_attempt_stalls_then_fails)))
    healthy = Relay(stalled.system, instance_id="relay-healthy")
    [key] = await append(stalled.system, 1, 2)
    first = asyncio.create_task(stalled.run_once())
    await asyncio.wait_for(entered.wait(), 10)
    await db.execute("UPDATE outbox SET locked_until = now() - interval '1 s'")  # it stalled past its lease
    second = asyncio.create_task(healthy.run_once())
    await wait_until(
        lambda: db.fetchval("SELECT locked_by = 'relay-healthy' FROM outbox ORDER BY id LIMIT 1")
    )

    release.set()
    await first
    overtaken.set()
    await second
    await healthy.drain()

    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert await applied(db) == {key: [1, 2]}
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0


async def test_a_row_applied_by_relays_that_died_before_acknowledging_is_acknowledged_not_dead_lettered(
    db, settings
):
    settings = replace(settings, retry_max_attempts=3)
    log: list = []
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(calls(log))))
    await append(relay.system, 1, 1)
    await db.execute("INSERT INTO inbox (subscriber, message_id) SELECT subscriber, message_id FROM outbox")
    await db.execute(
        "UPDATE outbox SET attempts = 3, locked_by = 'ghost',"
        " locked_until = now() - interval '1 s'"
    )

    await relay.drain()

    assert log == []
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0


# -- the inbox ----------------------------------------------------------------------------------


async def test_a_delivery_whose_commit_was_lost_is_applied_once_when_delivered_again(db, settings):
    """Replaces "a redelivered message is acknowledged without running the handler again": with
    no inbox row per delivery, a message comes again only if its effects were lost with its
    acknowledgement (here: the transaction rolled back after the handler ran), and then the
    next delivery applies it -- once."""
    log: list = []
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(calls(log))))
    [key] = await append(relay.system, 1, 1)
    acknowledge = relay._delivery.acknowledge

    async def lost(conn, ids):
        await acknowledge(conn, ids)
        raise ConnectionResetError("the commit never reached the database")

    relay._delivery.acknowledge = lost  # the fast run fails so, then its careful retry
    await relay.run_once()
    relay._delivery.acknowledge = acknowledge
    assert await applied(db) == {}
    await db.execute("UPDATE outbox SET available_at = now()")  # skip the retry's backoff

    assert await relay.drain() == 1

    assert log == [(key, 1, 1), (key, 1, 1), (key, 1, 2)]  # ran three times, only the last committed
    assert await applied(db) == {key: [1]}
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0
    assert await db.fetchval("SELECT count(*) FROM inbox") == 0  # no inbox row per delivery


async def test_a_redelivered_message_an_older_relay_applied_is_acknowledged_without_running_the_handler(
    db, settings
):
    """A relay before the lease-checked acknowledgement could commit an effect and its inbox
    row without the acknowledgement; the row then came again as a redelivery (last_error set):
    such rows are acknowledged without running the handler."""
    log: list = []
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(calls(log))))
    await append(relay.system, 1, 1)
    await db.execute("INSERT INTO inbox (subscriber, message_id) SELECT subscriber, message_id FROM outbox")
    await db.execute("UPDATE outbox SET last_error = 'lease expired: relay old stopped without an outcome'")

    assert await relay.drain() == 1

    assert log == []
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0


async def test_the_first_delivery_of_a_message_neither_reads_nor_writes_the_inbox(db, settings):
    log: list = []
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(calls(log))))
    [key] = await append(relay.system, 1, 1)
    # an inbox row no first delivery can have: were it read, the handler would not run
    await db.execute("INSERT INTO inbox (subscriber, message_id) SELECT subscriber, message_id FROM outbox")

    assert await relay.drain() == 1

    assert log == [(key, 1, 1)]
    assert await db.fetchval("SELECT count(*) FROM inbox") == 1  # the one written above, no other
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0


# -- subscribers are independent ----------------------------------------------------------------


async def test_a_failing_subscriber_neither_stops_nor_repeats_another_subscribers_deliveries(db, settings):
    settings = replace(settings, retry_max_attempts=3)
    good: list = []
    relay = relay_for(
        settings,
        db,
        Subscription(SUBSCRIBER, recorder(calls(good))),
        Subscription("testing.broken", recorder(always(RuntimeError("broken")))),
    )
    keys = await append(relay.system, 2, 3)

    await deliver_everything(relay)

    assert sorted(good) == sorted((key, seq, 1) for key in keys for seq in (1, 2, 3))  # once each, first try
    assert await applied(db) == {key: [1, 2, 3] for key in keys}
    broken = await db.fetch(
        "SELECT status, count(*) FROM outbox WHERE subscriber = 'testing.broken' GROUP BY 1"
    )
    assert dict(broken) == {"dead": 2, "blocked": 4}
    assert await applied(db, "testing.broken") == {}


# -- stopping -----------------------------------------------------------------------------------


async def test_stopping_releases_the_rows_whose_handlers_did_not_finish_in_time(db, settings):
    entered = asyncio.Event()

    async def hang(event: TestEvent, envelope: Envelope) -> None:
        entered.set()
        await asyncio.Event().wait()

    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(hang)))
    await append(relay.system, 3, 1)
    relay.start()
    await asyncio.wait_for(entered.wait(), 10)
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE locked_by IS NOT NULL") == 3

    await relay.stop(grace=0.2)

    rows = await db.fetch("SELECT status, locked_by, locked_until FROM outbox")
    assert [tuple(r) for r in rows] == [("pending", None, None)] * 3
    assert await applied(db) == {}


async def test_stopping_finishes_the_batch_in_hand_and_claims_nothing_more(db, settings):
    entered, release = asyncio.Event(), asyncio.Event()

    async def wait_for_release(event: TestEvent, envelope: Envelope) -> None:
        entered.set()
        await release.wait()

    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(wait_for_release)))
    keys = await append(relay.system, 2, 2)
    relay.start()
    await asyncio.wait_for(entered.wait(), 10)

    stopping = asyncio.create_task(relay.stop(grace=10))
    release.set()
    await stopping

    assert await applied(db) == {key: [1] for key in keys}
    rows = await db.fetch("SELECT status, attempts, locked_by FROM outbox WHERE status <> 'delivered'")
    assert [tuple(r) for r in rows] == [("pending", 0, None)] * 2


@pytest.mark.outbox_retention(3600)  # reads delivered rows
async def test_while_a_batch_is_in_its_handlers_the_next_batches_are_claimed_and_delivered(db, settings):
    settings = replace(settings, relay_batch_size=3)
    release = asyncio.Event()

    async def first_key_waits(event: TestEvent, envelope: Envelope) -> None:
        if event.key.endswith("00000"):
            await release.wait()

    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(first_key_waits)))
    keys = await append(relay.system, 9, 1)
    relay.start()

    async def later_batches_delivered() -> bool:
        return await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'delivered'") == 6

    await wait_until(later_batches_delivered, what="the batches after the stuck one to be delivered")
    # the first batch (keys 0-2, one subscriber: one group, in turn) is still held by key 0
    held = await db.fetch("SELECT partition_key, locked_by FROM outbox WHERE status <> 'delivered' ORDER BY id")
    assert [tuple(r) for r in held] == [(k, "relay-test") for k in keys[:3]]
    release.set()
    await relay.stop(grace=10)

    assert await applied(db) == {key: [1] for key in keys}
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0


# -- retention ----------------------------------------------------------------------------------


async def test_delivered_rows_past_the_retention_period_are_purged_in_batches_and_nothing_else(
    db, settings, monkeypatch
):
    import app.relay

    monkeypatch.setattr(app.relay, "PURGE_BATCH", 4)
    settings = replace(settings, outbox_retention_seconds=60.0)
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder()))
    await append(relay.system, 13, 1)
    await relay.drain()
    old = await db.fetch("SELECT id FROM outbox ORDER BY id LIMIT 10")
    await db.execute(
        "UPDATE outbox SET delivered_at = now() - interval '61 s' WHERE id = ANY($1::bigint[])",
        [r["id"] for r in old],
    )
    await db.execute("UPDATE outbox SET status = 'pending', delivered_at = NULL WHERE id = $1", old[0]["id"])

    assert await relay.purge_delivered(rounds=2) == 8  # two batches of 4, then it stops for now
    assert await relay.purge_delivered() == 1

    left = await db.fetch("SELECT id, status FROM outbox ORDER BY id")
    assert [r["id"] for r in left] == [old[0]["id"]] + [r["id"] for r in left[1:]]
    assert len(left) == 13 - 9  # the 3 recent delivered rows and the undelivered one stay
    assert [r["status"] for r in left] == ["pending"] + ["delivered"] * 3


# -- lingering ----------------------------------------------------------------------------------


@pytest.mark.outbox_retention(3600)  # reads delivered rows
async def test_after_a_wake_up_the_relay_lingers_so_the_next_commits_rows_go_in_the_same_claim(db, settings):
    settings = replace(settings, relay_linger_seconds=0.5)  # far longer than two commits take
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder()))
    claims: list[int] = []
    idle = asyncio.Event()
    claim = relay._claim

    async def counted_claim():
        batch = await claim()
        if batch is None:
            idle.set()  # nothing was due: the relay now waits for a wake-up
        else:
            claims.append(len(batch.rows))
        return batch

    relay._claim = counted_claim
    relay.start()
    try:
        await asyncio.wait_for(idle.wait(), 10)
        await append(relay.system, 1, 1)  # one commit wakes the relay ...
        async with relay.system.uow() as uow:  # ... and the next one, for another key, commits while it lingers
            ticker = Ticker("00001")
            ticker.tick()
            uow.add(ticker)
            await uow.commit()

        async def both_delivered() -> bool:
            return await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'delivered'") == 2

        await wait_until(both_delivered, what="both rows to be delivered")
    finally:
        await relay.stop(grace=10)

    assert claims == [2]  # one claim took both commits' rows
    assert await applied(db) == {"ticker-00000": [1], "ticker-00001": [1]}
