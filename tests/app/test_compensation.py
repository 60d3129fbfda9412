"""A subscription's on_dead_letter: the compensator runs in the transaction that parks the row,
its writes and events commit with the parking; if it fails, the row is parked without them and
the letter says why."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from app.messages import ConcurrencyError, PermanentError
from app.relay import Relay, dead_letters
from app.relay.claims import Claims
from app.relay.settle import _compensation
from app.uow import UnitOfWork
from app.wiring import Envelope, Subscription
from tests.app.relay_worker import (
    SUBSCRIBER,
    TestEvent,
    Ticker,
    append,
    applied,
    build_system,
    deliver_everything,
    recorder,
)

pytestmark = pytest.mark.usefixtures("effects")

COMPENSATED = "testing.compensated"  # the `subscriber` column of the compensator's effect rows


def always_fails(event: TestEvent, envelope: Envelope) -> None:
    """The first event of a key fails every time; the compensators' own tickers go through."""
    if event.seq == 1 and "undo" not in event.key:
        raise RuntimeError(f"cannot handle {event.key} #{event.seq}")


class Compensator:
    """Writes an effect row and records an event on a ticker of its own, then raises if told to.
    Remembers what it was given and what it saw of the parking from inside its transaction."""

    def __init__(self, db, fail: bool = False) -> None:
        self.db, self.fail = db, fail
        self.calls: list[dict] = []

    async def __call__(self, event: TestEvent, uow: UnitOfWork, envelope: Envelope, error: str) -> None:
        async with uow:
            conn = await uow.transaction()
            outbox_id = await conn.fetchval(
                "SELECT id FROM outbox WHERE message_id = $1 AND subscriber = $2", envelope.message_id, SUBSCRIBER
            )
            self.calls.append(
                {
                    "key": event.key,
                    "attempt": envelope.attempt,
                    "error": error,
                    "inside": await conn.fetchval("SELECT status FROM outbox WHERE id = $1", outbox_id),
                    "outside": await self.db.fetchval("SELECT status FROM outbox WHERE id = $1", outbox_id),
                }
            )
            await conn.execute(
                "INSERT INTO relay_test_effects (subscriber, message_id, key, seq, attempt) VALUES ($1, $2, $3, $4, $5)",
                COMPENSATED,
                envelope.message_id,
                event.key,
                event.seq,
                envelope.attempt,
            )
            ticker = await uow.find(Ticker, f"undo-{event.key}") or Ticker(f"undo-{event.key}")
            ticker.tick()
            uow.add(ticker)
            await uow.commit()
            if self.fail:
                raise RuntimeError("the compensator broke too")


def relay_with(settings, db, compensator, handler=None) -> Relay:
    subscription = Subscription(
        SUBSCRIBER, handler or recorder(always_fails), max_attempts=3, on_dead_letter=compensator
    )
    return Relay(build_system(replace(settings, retry_max_attempts=3), db, [subscription]), instance_id="relay-test")


async def letter_of(db) -> dict:
    [letter] = await db.fetch("SELECT * FROM dead_letters")
    return dict(letter)


async def test_a_compensator_runs_once_with_the_event_the_last_attempt_and_the_error(settings, db):
    compensator = Compensator(db)
    relay = relay_with(settings, db, compensator)
    [key] = await append(relay.system, 1, 1)

    await deliver_everything(relay)

    assert [(c["key"], c["attempt"], c["error"]) for c in compensator.calls] == [
        (key, 3, "RuntimeError: cannot handle ticker-00000 #1")
    ]


async def test_a_compensator_runs_inside_the_transaction_that_parks_the_row(settings, db):
    compensator = Compensator(db)
    relay = relay_with(settings, db, compensator)
    await append(relay.system, 1, 1)

    await deliver_everything(relay)

    # inside: the row is already dead; outside, the parking had not committed yet
    assert [(c["inside"], c["outside"]) for c in compensator.calls] == [("dead", "pending")]


async def test_a_compensators_writes_and_events_commit_with_the_parking(settings, db):
    relay = relay_with(settings, db, Compensator(db))
    [key] = await append(relay.system, 1, 1)

    await deliver_everything(relay)

    letter = await letter_of(db)
    assert (letter["status"], letter["compensation"]) == ("parked", "compensated")
    assert await applied(db, COMPENSATED) == {key: [1]}
    assert await db.fetchval("SELECT count(*) FROM events WHERE stream_id = $1", f"ticker-undo-{key}") == 1
    assert await db.fetchval("SELECT status FROM outbox WHERE id = $1", letter["outbox_id"]) == "dead"


async def test_a_failing_compensator_leaves_the_row_parked_without_its_effects_and_says_why(
    settings, db, caplog
):
    relay = relay_with(settings, db, Compensator(db, fail=True))
    [key] = await append(relay.system, 1, 2)

    with caplog.at_level(logging.ERROR, logger="app.relay"):
        await deliver_everything(relay)

    letter = await letter_of(db)
    assert letter["status"] == "parked"
    assert letter["compensation"] == "compensation failed: RuntimeError: the compensator broke too"
    statuses = await db.fetch("SELECT status, blocked_by FROM outbox ORDER BY id")
    assert [tuple(s) for s in statuses] == [("dead", None), ("blocked", letter["id"])]  # parked as ever
    assert await applied(db, COMPENSATED) == {}  # rolled back to its savepoint
    assert await db.fetchval("SELECT count(*) FROM events WHERE stream_id = $1", f"ticker-undo-{key}") == 0
    # two lines at error: the dead letter itself (issue 13: dead letters log at error) and its failed compensation
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    [failure] = [m for m in errors if "parked without compensation" in m]
    assert "compensation failed: RuntimeError: the compensator broke too" in failure
    [parked] = [m for m in errors if m.startswith("dead-lettered outbox row")]
    assert len(errors) == 2, errors


async def test_a_row_without_a_compensator_is_parked_with_no_compensation(settings, db):
    relay = relay_with(settings, db, None)
    await append(relay.system, 1, 1)

    await deliver_everything(relay)

    letter = await letter_of(db)
    assert (letter["status"], letter["compensation"]) == ("parked", None)


async def test_a_relay_that_lost_the_rows_lease_neither_parks_nor_compensates_it(settings, db):
    compensator = Compensator(db)
    system = relay_with(settings, db, compensator).system
    await append(system, 1, 1)
    batch = await Claims(db, "relay-a", [SUBSCRIBER], 1, 30.0).claim()
    batch.keeper.cancel()
    [row] = batch.rows
    compensation = _compensation(system, row, "PermanentError: no")
    letter = await dead_letters.park(db, row, PermanentError("no"), "PermanentError: no", "relay-b", compensation)

    assert letter is None
    assert compensator.calls == []
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0


async def test_a_replayed_row_is_compensated_again_when_it_is_dead_lettered_again(settings, db):
    compensator = Compensator(db)
    relay = relay_with(settings, db, compensator)
    [key] = await append(relay.system, 1, 1)
    await deliver_everything(relay)
    [first] = await dead_letters.parked_ids(db)

    assert await dead_letters.replay(db, [first], "alice") == [first]
    await deliver_everything(relay)

    assert len(compensator.calls) == 2
    assert await db.fetchval("SELECT count(*) FROM events WHERE stream_id = $1", f"ticker-undo-{key}") == 2
    rows = await db.fetch("SELECT status, compensation FROM dead_letters ORDER BY id")
    assert [tuple(r) for r in rows] == [("replayed", "compensated"), ("parked", "compensated")]


def test_a_compensator_that_needs_an_unknown_dependency_fails_at_start_up(settings, db):
    async def compensate(event: TestEvent, uow: UnitOfWork, ledger: object) -> None: ...

    with pytest.raises(TypeError, match=r"needs \['ledger'\]"):
        build_system(settings, db, [Subscription(SUBSCRIBER, recorder(), on_dead_letter=compensate)])


def test_a_compensators_dependencies_are_bound_by_name_like_a_handlers(settings, db):
    async def compensate(event: TestEvent, error: str, settings) -> None: ...

    system = build_system(settings, db, [Subscription(SUBSCRIBER, recorder(), on_dead_letter=compensate)])

    assert system.subscriptions[SUBSCRIBER].compensator is not None


async def test_a_compensator_that_lost_a_race_decides_again_in_a_new_savepoint(settings, db):
    calls = []

    async def compensate(event: TestEvent, uow: UnitOfWork) -> None:
        calls.append(event.key)
        if len(calls) == 1:
            raise ConcurrencyError("another writer appended first")

    relay = relay_with(settings, db, compensate)
    await append(relay.system, 1, 1)

    await deliver_everything(relay)

    assert len(calls) == 2
    assert (await letter_of(db))["compensation"] == "compensated"
