"""The relay's fast path: a run of one subscriber's deliveries in one transaction without
savepoints, acknowledged in one statement. What must hold: a handler failure rolls the
run back and costs nothing but a re-run of that run's earlier deliveries (each still applied
once); a run that appended events commits once it has held them RUN_HOLD_SECONDS, and the rest
is still delivered;
a subscriber that failed is delivered carefully (no re-runs) for a while."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from app.aggregate import Aggregate
from app.bootstrap import bootstrap
from app.messages import Event
from app.relay import Relay
from app.relay.ack import ACK_SQL
from app.uow import UnitOfWork
from app.wiring import Envelope, Module, Subscription
from tests.app.relay_worker import (
    SUBSCRIBER,
    TestEvent,
    append,
    applied,
    deliver_everything,
    recorder,
    relay_for,
)
from tests.app.testing_contract.events import Counted

pytestmark = [pytest.mark.usefixtures("effects"), pytest.mark.outbox_retention(3600)]  # they read delivered rows



async def effect_counts(db) -> Counter:
    rows = await db.fetch("SELECT message_id, count(*) AS n FROM relay_test_effects GROUP BY 1")
    return Counter({r["message_id"]: r["n"] for r in rows})


async def test_a_failure_mid_run_applies_every_other_delivery_once_and_retries_only_the_failed_one(
    db, settings
):
    settings = replace(settings, retry_base_seconds=0.001, retry_cap_seconds=0.001)
    calls: Counter = Counter()
    failed: list[str] = []

    def fail_third_once(event: TestEvent, envelope: Envelope) -> None:
        calls[event.key] += 1
        if event.key.endswith("00002") and not failed:
            failed.append(event.key)
            raise RuntimeError("once")

    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(fail_third_once)))
    keys = await append(relay.system, 6, 1)

    await deliver_everything(relay)

    assert await applied(db) == {key: [1] for key in keys}
    assert set((await effect_counts(db)).values()) == {1}  # no double apply
    # the two before the failure ran in the rolled-back run and again; the failed one ran twice
    # (its failure, then its retry); the three after it ran once
    assert [calls[k] for k in keys] == [2, 2, 2, 1, 1, 1]
    attempts = await db.fetch("SELECT partition_key, attempts FROM outbox ORDER BY id")
    assert [r["attempts"] for r in attempts] == [1, 1, 2, 1, 1, 1]


class Echoed(Event, tag="testing.Echoed"):
    """No subscribers: appending it needs no relay."""

    key: str


class Echo(Aggregate):
    stream_type = "echo"

    def _apply(self, event: Event) -> None:
        pass


def echo_every_other_key(ran: list[str]):
    async def echo_every_other(event: TestEvent, uow: UnitOfWork, envelope: Envelope) -> None:
        ran.append(event.key)
        if int(event.key[-1]) % 2 == 0:
            echo = Echo(event.key)
            echo._record(Echoed(key=event.key))
            uow.add(echo)
            await uow.commit()

    return echo_every_other


async def delivery_transactions(db) -> list[list[int]]:
    """Which outbox rows (by number) were acknowledged in the same transaction."""
    acks = await db.fetch("SELECT xmin::text AS tx FROM outbox ORDER BY id")
    runs: dict[str, list[int]] = {}
    for number, row in enumerate(acks):
        runs.setdefault(row["tx"], []).append(number)
    return sorted(runs.values())


async def test_a_run_that_appended_events_commits_once_it_has_held_them_long_enough(db, settings, monkeypatch):
    import app.relay

    monkeypatch.setattr(app.relay, "RUN_HOLD_SECONDS", 0.0)  # commit after every delivery that appended
    ran: list[str] = []

    relay = relay_for(settings, db, Subscription(SUBSCRIBER, echo_every_other_key(ran)))
    keys = await append(relay.system, 8, 1)

    assert await relay.run_once() == 8

    assert ran == keys  # every delivery ran, in order, once
    echoes = await db.fetch("SELECT stream_id FROM events WHERE type = 'testing.Echoed' ORDER BY position")
    assert [r["stream_id"] for r in echoes] == [f"echo-{k}" for k in keys if int(k[-1]) % 2 == 0]
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'delivered'") == 8
    assert await db.fetchval("SELECT count(*) FROM inbox") == 0  # no inbox row per delivery
    # runs end after each delivery that appended: acknowledgements and echoes committed together,
    # in the transactions {0}, {1, 2}, {3, 4}, {5, 6}, {7}
    assert await delivery_transactions(db) == [[0], [1, 2], [3, 4], [5, 6], [7]]
    acks = await db.fetch("SELECT xmin::text AS tx FROM outbox ORDER BY id")
    echo_tx = await db.fetch("SELECT xmin::text AS tx FROM events WHERE type = 'testing.Echoed' ORDER BY position")
    assert [r["tx"] for r in echo_tx] == [acks[n]["tx"] for n in (0, 2, 4, 6)]


async def test_a_quick_run_delivers_a_whole_group_in_one_transaction_appends_included(db, settings, monkeypatch):
    import app.relay

    monkeypatch.setattr(app.relay, "RUN_HOLD_SECONDS", 60.0)
    ran: list[str] = []
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, echo_every_other_key(ran)))
    keys = await append(relay.system, 8, 1)

    assert await relay.run_once() == 8

    assert ran == keys
    assert await delivery_transactions(db) == [list(range(8))]
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'testing.Echoed'") == 4


async def test_after_a_failure_the_subscriber_is_delivered_carefully_so_good_deliveries_do_not_rerun(
    db, settings
):
    settings = replace(
        settings, retry_base_seconds=0.001, retry_cap_seconds=0.001, retry_max_attempts=50, relay_batch_size=4
    )
    calls: Counter = Counter()

    def bad_key_always_fails(event: TestEvent, envelope: Envelope) -> None:
        calls[event.key] += 1
        if event.key.endswith("00000"):
            raise RuntimeError("always")

    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(bad_key_always_fails)))
    keys = await append(relay.system, 12, 1)
    for _ in range(6):  # the first batch holds the bad key first: nothing before it re-runs
        await db.execute("UPDATE outbox SET available_at = now() WHERE status = 'pending'")
        await relay.run_once()

    assert [calls[k] for k in keys[1:]] == [1] * 11  # no good delivery ran twice
    assert calls[keys[0]] >= 3  # the bad one kept failing and being retried
    assert await applied(db) == {k: [1] for k in keys[1:]}


async def test_a_concurrency_conflict_runs_the_run_again_without_spending_an_attempt_or_going_careful(
    db, settings
):
    from app.messages import ConcurrencyError

    conflicted: list[str] = []

    def conflict_once_on_the_second(event: TestEvent, envelope: Envelope) -> None:
        if event.key.endswith("00001") and not conflicted:
            conflicted.append(event.key)
            raise ConcurrencyError("stream changed concurrently")

    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder(conflict_once_on_the_second)))
    keys = await append(relay.system, 4, 1)

    assert await relay.run_once() == 4

    assert conflicted == [keys[1]]
    assert await applied(db) == {key: [1] for key in keys}
    assert set((await effect_counts(db)).values()) == {1}
    rows = await db.fetch("SELECT status, attempts FROM outbox ORDER BY id")
    assert [tuple(r) for r in rows] == [("delivered", 1)] * 4
    assert relay._careful_until == {}  # still on the fast path


# no unique constraint but the surrogate key: a row written twice shows as two rows
STAGE_DDL = """
CREATE TABLE IF NOT EXISTS relay_test_staged (id bigserial PRIMARY KEY, message_id uuid NOT NULL, key text NOT NULL)
"""


def staging(fail_key: str | None = None, failed: list | None = None):
    async def stage(event: TestEvent, uow: UnitOfWork, envelope: Envelope) -> None:
        uow.stage("relay_test_staged", {"message_id": "uuid", "key": "text"}, [(envelope.message_id, event.key)])
        await uow.commit()
        if event.key == fail_key and failed is not None and not failed:
            failed.append(event.key)
            raise RuntimeError("after staging")

    return stage


async def test_rows_staged_by_a_runs_handlers_are_written_with_the_run_in_one_statement(db, settings):
    await db.execute(STAGE_DDL)
    await db.execute("TRUNCATE relay_test_staged")
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, staging()))
    keys = await append(relay.system, 6, 1)

    assert await relay.run_once() == 6

    rows = await db.fetch("SELECT key, xmin::text AS tx FROM relay_test_staged ORDER BY key")
    assert [r["key"] for r in rows] == keys
    assert await delivery_transactions(db) == [list(range(6))]  # one run
    acked_in = await db.fetchval("SELECT DISTINCT xmin::text FROM outbox")
    assert {r["tx"] for r in rows} == {acked_in}  # written by the run's transaction


async def test_rows_staged_in_a_run_that_rolls_back_are_written_once_by_the_redelivery(db, settings):
    await db.execute(STAGE_DDL)
    await db.execute("TRUNCATE relay_test_staged")
    failed: list = []
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, staging("ticker-00003", failed)))
    keys = await append(relay.system, 6, 1)

    await deliver_everything(relay)

    assert failed == ["ticker-00003"]
    assert [r["key"] for r in await db.fetch("SELECT key FROM relay_test_staged ORDER BY key")] == keys


class Tally(Aggregate):
    stream_type = "tally"

    def count(self, key: str) -> None:
        self._record(Counted(key=key))

    def _apply(self, event: Event) -> None:
        pass


async def tally_versions(db) -> list[int]:
    return [r["version"] for r in await db.fetch("SELECT version FROM events WHERE stream_id = 'tally-all' ORDER BY position")]


async def test_deliveries_of_one_run_that_change_one_stream_see_each_others_events(db, settings, monkeypatch):
    import app.relay

    monkeypatch.setattr(app.relay, "RUN_HOLD_SECONDS", 60.0)

    async def count(event: TestEvent, uow: UnitOfWork) -> None:
        async with uow:
            tally = await uow.find(Tally, "all") or Tally("all")
            tally.count(event.key)
            uow.add(tally)
            await uow.commit()

    relay = relay_for(settings, db, Subscription(SUBSCRIBER, count))
    await append(relay.system, 8, 1)

    assert await relay.run_once() == 8

    assert await tally_versions(db) == list(range(1, 9))  # one run, one append, versions in turn
    assert await delivery_transactions(db) == [list(range(8))]
    tally_tx = {r["tx"] for r in await db.fetch("SELECT xmin::text AS tx FROM events WHERE stream_id = 'tally-all'")}
    assert tally_tx == {await db.fetchval("SELECT DISTINCT xmin::text FROM outbox")}


async def test_a_run_whose_append_loses_a_race_runs_again_on_fresh_state(db, settings, monkeypatch):
    import app.relay

    monkeypatch.setattr(app.relay, "RUN_HOLD_SECONDS", 60.0)
    raced: list[str] = []

    async def count(event: TestEvent, uow: UnitOfWork) -> None:
        async with uow:
            tally = await uow.get(Tally, "all")
            tally.count(event.key)
            await uow.commit()
        if not raced:  # another writer appends to the tally before the run's append
            raced.append(event.key)
            other = relay.system.uow()
            async with other:
                theirs = await other.get(Tally, "all")
                theirs.count("other writer")
                await other.commit()

    module = Module(
        name="testing", package="tests.app.testing_contract", subscriptions={TestEvent: [Subscription(SUBSCRIBER, count)]}
    )
    relay = Relay(bootstrap(replace(settings, modules=None), db, modules=[module]), instance_id="relay-test")
    system = relay.system
    first = system.uow()
    async with first:  # the tally exists at version 1
        tally = Tally("all")
        tally.count("seed")
        first.add(tally)
        await first.commit()
    await append(system, 4, 1)

    assert await relay.run_once() == 4

    assert len(raced) == 1
    assert await tally_versions(db) == list(range(1, 7))  # seed, the other writer, then the run's 4
    keys = [r["key"] for r in await db.fetch(
        "SELECT data->>'key' AS key FROM events WHERE stream_id = 'tally-all' ORDER BY position"
    )]
    assert keys[:2] == ["seed", "other writer"] and sorted(keys[2:]) == sorted(
        r["partition_key"] for r in await db.fetch("SELECT partition_key FROM outbox")
    )
    assert relay._careful_until == {}


async def test_the_acknowledgement_makes_only_its_own_transaction_commit_without_a_flush_wait(db):
    """A delivery's transaction commits asynchronously (ACK_SQL turns
    synchronous_commit off for it, whether or not it matched rows); the connection's next
    transaction -- e.g. a request's, on the same pooled connection -- is durable again."""
    async with db.acquire() as conn:
        for ids in ([], [-1]):
            async with conn.transaction():
                assert await conn.fetchval("SHOW synchronous_commit") == "on"
                await conn.execute(ACK_SQL, ids, "relay-test")
                assert await conn.fetchval("SHOW synchronous_commit") == "off"
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
