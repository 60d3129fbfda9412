"""Ordered dead-lettering: a dead row parks the rest of its key until an operator replays or
discards it; other keys carry on; every action is in the history with its actor."""

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
    applied,
    build_system,
    deliver_everything,
    recorder,
    tick,
)

pytestmark = pytest.mark.usefixtures("effects")


class Poison:
    """Rejects the events listed in `bad` ((stream number, seq)) until `cured`."""

    def __init__(self, *bad: tuple[int, int]) -> None:
        self.bad = {(f"ticker-{n:05d}", seq) for n, seq in bad}
        self.cured = False

    def __call__(self, event: TestEvent, envelope: Envelope) -> None:
        if not self.cured and (event.key, event.seq) in self.bad:
            raise PermanentError(f"cannot handle {event.key} #{event.seq}")


@pytest.fixture
def poison() -> Poison:
    return Poison((0, 1))  # the first event of the first key


@pytest.fixture
def relay(settings, db, poison) -> Relay:
    system = build_system(
        replace(settings, retry_max_attempts=3), db, [Subscription(SUBSCRIBER, recorder(poison))]
    )
    return Relay(system, instance_id="relay-test")


async def parked_key(relay: Relay) -> tuple[list[str], int]:
    """Two keys of three events; the first key's first event dead-letters. Returns keys, letter id."""
    keys = await append(relay.system, 2, 3)
    await deliver_everything(relay)
    [letter] = await operations.parked_ids(relay.db)
    return keys, letter


async def outbox_rows(db, key: str) -> list[tuple]:
    rows = await db.fetch(
        "SELECT o.status, o.blocked_by, e.version FROM outbox o JOIN events e ON e.event_id = o.message_id"
        " WHERE o.partition_key = $1 AND o.status <> 'delivered' ORDER BY o.id",
        key,
    )
    return [(r["version"], r["status"], r["blocked_by"]) for r in rows]


async def history(db, letter: int) -> list[tuple[str, str]]:
    rows = await db.fetch(
        "SELECT action, actor FROM dead_letter_history WHERE dead_letter_id = $1 ORDER BY id", letter
    )
    return [(r["action"], r["actor"]) for r in rows]


async def test_a_dead_letter_parks_the_later_rows_of_its_key(relay, db):
    (parked, _), letter = await parked_key(relay)

    assert await outbox_rows(db, parked) == [
        (1, "dead", None),
        (2, "blocked", letter),
        (3, "blocked", letter),
    ]
    assert await db.fetchval("SELECT outbox_id FROM dead_letters WHERE id = $1", letter) == await db.fetchval(
        "SELECT id FROM outbox WHERE partition_key = $1 AND status = 'dead'", parked
    )
    assert parked not in await applied(db)


async def test_other_keys_are_delivered_while_one_key_is_parked(relay, db):
    (parked, other), _ = await parked_key(relay)

    assert await applied(db) == {other: [1, 2, 3]}
    assert await outbox_rows(db, other) == []


async def test_rows_added_to_a_parked_key_later_wait_behind_its_dead_letter(relay, db):
    (parked, _), letter = await parked_key(relay)

    await tick(relay.system, 0)
    await relay.drain()

    assert parked not in await applied(db)
    assert (await outbox_rows(db, parked))[-1] == (4, "pending", None)
    status = await operations.outbox_status(db)
    assert [(k["partition_key"], k["dead_letter_id"], k["waiting"]) for k in status["parked_keys"]] == [
        (parked, letter, 3)
    ]


async def test_replaying_a_dead_letter_delivers_its_key_in_order_starting_with_the_replayed_row(
    relay, db, poison
):
    (parked, other), letter = await parked_key(relay)
    await tick(relay.system, 0)
    poison.cured = True

    assert await operations.replay(db, [letter], "alice") == [letter]
    await deliver_everything(relay)

    assert (await applied(db))[parked] == [1, 2, 3, 4]
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0
    resolved = await db.fetchrow(
        "SELECT status, resolved_by, resolved_at IS NOT NULL AS resolved FROM dead_letters"
    )
    assert dict(resolved) == {"status": "replayed", "resolved_by": "alice", "resolved": True}
    assert await history(db, letter) == [("parked", "relay:relay-test"), ("replayed", "alice")]


async def test_a_replayed_row_that_fails_again_parks_its_key_behind_a_new_dead_letter(relay, db):
    (parked, _), letter = await parked_key(relay)

    await operations.replay(db, [letter], "alice")
    await deliver_everything(relay)

    [again] = await operations.parked_ids(db)
    assert again != letter
    assert await outbox_rows(db, parked) == [(1, "dead", None), (2, "blocked", again), (3, "blocked", again)]
    assert await db.fetchval("SELECT attempts FROM dead_letters WHERE id = $1", again) == 1  # counted afresh


async def test_discarding_a_dead_letter_releases_its_key_without_delivering_it(relay, db):
    (parked, _), letter = await parked_key(relay)

    assert await operations.discard(db, [letter], "bob") == [letter]
    await deliver_everything(relay)

    assert (await applied(db))[parked] == [2, 3]
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0
    assert await db.fetchval("SELECT status FROM dead_letters WHERE id = $1", letter) == "discarded"
    assert await history(db, letter) == [("parked", "relay:relay-test"), ("discarded", "bob")]


async def test_a_resolved_dead_letter_cannot_be_resolved_again(relay, db):
    _, letter = await parked_key(relay)
    await operations.discard(db, [letter], "bob")

    assert await operations.replay(db, [letter], "alice") == []
    assert await operations.discard(db, [letter], "alice") == []
    assert await history(db, letter) == [("parked", "relay:relay-test"), ("discarded", "bob")]


async def test_replaying_one_key_leaves_another_parked_key_parked(settings, db):
    poison = Poison((0, 1), (1, 2))
    relay = Relay(
        build_system(settings, db, [Subscription(SUBSCRIBER, recorder(poison))]), instance_id="relay-test"
    )
    first, second = await append(relay.system, 2, 3)
    await deliver_everything(relay)
    letters = dict(await db.fetch("SELECT partition_key, id FROM dead_letters"))
    poison.cured = True

    await operations.replay(db, [letters[first]], "alice")
    await deliver_everything(relay)

    assert await applied(db) == {first: [1, 2, 3], second: [1]}
    assert await outbox_rows(db, second) == [(2, "dead", None), (3, "blocked", letters[second])]
