"""Batch subscriptions under three relays at once (issue 14's acceptance test): over a mixed
stream -- many keys, two event types, a batch subscriber and a plain one -- with events that fail
on their first attempt and one that always fails, every event is applied exactly once per
subscriber, in per-key order, and the one that always fails ends in dead_letters alone. The
batch handler records an event per item under that item's context: each carries the ids of the
item that caused it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from app.aggregate import Aggregate
from app.bootstrap import bootstrap
from app.db import Database
from app.messages import Event
from app.uow import UnitOfWork
from app.wiring import BatchItem, Envelope, Module, Subscription
from tests.app.relay_worker import run_relays_until_settled

KEYS, EVENTS = 200, 6  # 1,200 events, 2,400 outbox rows
BATCH, PLAIN = "testing.batch_record", "testing.plain_record"
FLAKY_KEYS = {f"tab-{n:04d}" for n in range(0, KEYS, 7)}  # their 3rd event fails on its first attempt
DOOMED = ("tab-0005", EVENTS)  # the last event of its key (nothing waits behind it) always fails


class Opened(Event, tag="testing.Opened"):
    """A tab was opened or reopened."""

    key: str
    seq: int


class Noted(Event, tag="testing.Noted"):
    """Something was noted on a tab."""

    key: str
    seq: int


class Echoed(Event, tag="testing.BatchEchoed"):
    """The batch subscriber saw an event (no one subscribes)."""

    source: str


class Tab(Aggregate):
    stream_type = "tab"

    def note(self, times: int) -> None:
        for _ in range(times):
            seq = self.version + 1
            kind = Opened if seq % 3 == 1 else Noted
            self._record(kind(key=self.stream_id, seq=seq))

    def _apply(self, event: Event) -> None:
        pass


class Echo(Aggregate):
    stream_type = "batch-echo"

    def _apply(self, event: Event) -> None:
        pass


class Doomed(RuntimeError):
    pass


def fails(event: Opened | Noted, attempt: int) -> bool:
    return (event.key, event.seq) == DOOMED or (event.key in FLAKY_KEYS and event.seq == 3 and attempt == 1)


INSERT_EFFECTS = """
INSERT INTO relay_test_effects (subscriber, message_id, key, seq, attempt)
SELECT $1, * FROM unnest($2::uuid[], $3::text[], $4::int[], $5::int[])
"""


def subscriptions(batches: list[list[str]]) -> list[Subscription]:
    async def batch_record(items: list[BatchItem], uow: UnitOfWork) -> None:
        batches.append([item.event.key for item in items])
        conn = await uow.transaction()
        await conn.execute(
            INSERT_EFFECTS,
            BATCH,
            [i.envelope.message_id for i in items],
            [i.event.key for i in items],
            [i.event.seq for i in items],
            [i.envelope.attempt for i in items],
        )
        for item in items:
            with item.recording():
                echo = Echo(item.envelope.message_id)
                echo._record(Echoed(source=str(item.envelope.message_id)))
                uow.add(echo)
                await uow.commit()
        for item in items:  # after the writes: the rollback must take them away
            if fails(item.event, item.envelope.attempt):
                raise Doomed(f"{item.event.key} #{item.event.seq} attempt {item.envelope.attempt}")

    async def plain_record(event: Opened | Noted, uow: UnitOfWork, envelope: Envelope) -> None:
        conn = await uow.transaction()
        await conn.execute(
            INSERT_EFFECTS, PLAIN, [envelope.message_id], [event.key], [event.seq], [envelope.attempt]
        )

    return [Subscription(BATCH, batch_record, batch=True), Subscription(PLAIN, plain_record)]


def build(settings, db: Database, subs: list[Subscription]):
    module = Module(name="testing", subscriptions={Opened: subs, Noted: subs})
    return bootstrap(replace(settings, modules=None), db, modules=[module])


pytestmark = pytest.mark.usefixtures("effects")


async def append_tabs(system) -> None:
    for start in range(0, KEYS, 50):
        async with system.uow() as uow:
            for n in range(start, start + 50):
                tab = Tab(f"{n:04d}")
                tab.note(EVENTS)
                uow.add(tab)
            await uow.commit()


async def test_three_relays_deliver_a_batch_and_a_plain_subscriber_once_each_in_key_order(db, settings):
    settings = replace(settings, relay_batch_size=100, retry_max_attempts=3)
    batches: list[list[str]] = []
    subs = subscriptions(batches)
    await append_tabs(build(settings, db, subs))
    await run_relays_until_settled(
        db, lambda pool: build(settings, pool, subs), pool_size=6, concurrency=6, seconds=60
    )

    events = await db.fetch(
        "SELECT event_id, stream_id, version, metadata FROM events WHERE stream_id LIKE 'tab-%'"
    )
    assert len(events) == KEYS * EVENTS
    doomed = next(e["event_id"] for e in events if (e["stream_id"], e["version"]) == DOOMED)
    # the failing event ends in dead_letters alone: one letter, nothing parked behind it
    letters = await db.fetch("SELECT subscriber, message_id, status FROM dead_letters")
    assert [tuple(r) for r in letters] == [(BATCH, doomed, "parked")]
    left = await db.fetch("SELECT subscriber, message_id, status FROM outbox WHERE status <> 'delivered'")
    assert [tuple(r) for r in left] == [(BATCH, doomed, "dead")]
    # every other event applied exactly once per subscriber, and in each key's order
    for subscriber, expected in (
        (PLAIN, {e["event_id"] for e in events}),
        (BATCH, {e["event_id"] for e in events} - {doomed}),
    ):
        effects = await db.fetch(
            "SELECT message_id, key, seq FROM relay_test_effects WHERE subscriber = $1 ORDER BY id",
            subscriber,
        )
        ids = [r["message_id"] for r in effects]
        assert len(ids) == len(set(ids)) and set(ids) == expected, subscriber
        by_key: dict[str, list[int]] = {}
        for r in effects:
            by_key.setdefault(r["key"], []).append(r["seq"])
        for key, seqs in by_key.items():
            assert seqs == list(range(1, len(seqs) + 1)), (subscriber, key, seqs)
    # batches held several keys, never two rows of one key; the flaky events were retried
    assert max(map(len, batches)) > 1
    assert all(len(keys) == len(set(keys)) for keys in batches)
    assert await db.fetchval(
        "SELECT count(*) FROM relay_test_effects WHERE subscriber = $1 AND attempt = 2", BATCH
    ) == len(FLAKY_KEYS)
    # one echo per applied batch item, carrying that item's correlation and causation ids
    source = {str(e["event_id"]): json.loads(e["metadata"]) for e in events}
    echoes = await db.fetch("SELECT data, metadata FROM events WHERE stream_id LIKE 'batch-echo-%'")
    assert len(echoes) == len(events) - 1
    for echo in echoes:
        caused_by, metadata = json.loads(echo["data"])["source"], json.loads(echo["metadata"])
        assert metadata["causation_id"] == caused_by
        assert metadata["correlation_id"] == source[caused_by]["correlation_id"]
