"""A throwaway "testing" module for the relay tests, and a relay process the crash tests kill.

As a library: `TestEvent`, the `Ticker` aggregate that records them, `build_system()` which
bootstraps a system hosting only the subscriptions a test gives it, and helpers that append
events, read the handler effects and poll the database.

As a script (`python -m tests.app.relay_worker MODE INSTANCE`, DATABASE_URL in the environment):
runs a relay over `testing.record` with a one-second lease and hangs where MODE says, after
printing one line to stdout:
  handler  deliver each key's first event, then hang inside the handler of the second
           ("claimed"): its effect is written but never committed;
  settle   run the first batch's handlers, then hang before acknowledging and committing it
           ("applied"): nothing is committed, the rows are still in flight.
  charge   a relay over the whole application (every module) whose payment provider prints
           "charge N" for each attempt N and hangs inside the third: the charge's row stays
           leased by this relay, two attempts spent.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from app.aggregate import Aggregate
from app.bootstrap import System, bootstrap
from app.db import Database
from app.messages import Event
from app.relay import Relay
from app.settings import Settings
from app.uow import UnitOfWork
from app.wiring import Envelope, Module, Subscription
from modules.payments.gateway import fake_provider

SUBSCRIBER = "testing.record"

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS relay_test_effects (
    id          bigserial PRIMARY KEY,     -- apply order: a key's next row starts after this commit
    subscriber  text NOT NULL,
    message_id  uuid NOT NULL,             -- deliberately not unique: a double apply shows as two rows
    key         text NOT NULL,
    seq         integer NOT NULL,
    attempt     integer NOT NULL
)
"""


class TestEvent(Event, tag="testing.TestEvent"):
    """Something happened to a ticker; `seq` is its version in the ticker's stream."""

    __test__ = False  # not a pytest test class

    key: str
    seq: int


class Ticker(Aggregate):
    stream_type = "ticker"

    def tick(self, times: int = 1) -> None:
        for _ in range(times):
            self._record(TestEvent(key=self.stream_id, seq=self.version + 1))

    def _apply(self, event: Event) -> None:
        pass


Handler = Callable[..., Awaitable[Any]]
Failure = Callable[[TestEvent, Envelope], Awaitable[None] | None]


def recorder(fail: Failure | None = None) -> Handler:
    """A subscriber that writes its effect in the delivery's transaction, then calls `fail`
    (which may raise, or hang): a failure after the write must leave no effect behind."""

    async def record(event: TestEvent, uow: UnitOfWork, envelope: Envelope) -> None:
        conn = await uow.transaction()
        await conn.execute(
            "INSERT INTO relay_test_effects (subscriber, message_id, key, seq, attempt) VALUES ($1, $2, $3, $4, $5)",
            envelope.subscriber,
            envelope.message_id,
            event.key,
            event.seq,
            envelope.attempt,
        )
        if fail is not None:
            outcome = fail(event, envelope)
            if outcome is not None:
                await outcome

    return record


def build_system(
    settings: Settings, db: Database, subscriptions: Sequence[Subscription] | None = None
) -> System:
    subscriptions = (
        list(subscriptions) if subscriptions is not None else [Subscription(SUBSCRIBER, recorder())]
    )
    module = Module(name="testing", subscriptions={TestEvent: subscriptions})
    return bootstrap(replace(settings, modules=None), db, modules=[module])


def relay_for(settings: Settings, db: Database, *subscriptions: Subscription) -> Relay:
    """A relay (instance "relay-test") over a system hosting only these subscriptions."""
    return Relay(build_system(settings, db, subscriptions), instance_id="relay-test")


async def reset_effects(db: Database) -> None:
    await db.execute(EFFECTS_DDL)
    await db.execute("TRUNCATE relay_test_effects RESTART IDENTITY")


async def append(system: System, keys: int, events_per_key: int, *, per_commit: int = 100) -> list[str]:
    """Append `events_per_key` events to each of `keys` new tickers; returns their stream ids."""
    streams = []
    for start in range(0, keys, per_commit):
        uow = system.uow()
        async with uow:
            for number in range(start, min(start + per_commit, keys)):
                ticker = Ticker(f"{number:05d}")
                ticker.tick(events_per_key)
                uow.add(ticker)
                streams.append(ticker.stream_id)
            await uow.commit()
    return streams


async def tick(system: System, stream_number: int, times: int = 1) -> None:
    """Append more events to an existing ticker."""
    uow = system.uow()
    async with uow:
        ticker = await uow.get(Ticker, f"{stream_number:05d}")
        ticker.tick(times)
        await uow.commit()


async def applied(db: Database, subscriber: str = SUBSCRIBER) -> dict[str, list[int]]:
    """Each key's applied seqs, in the order they were applied."""
    rows = await db.fetch(
        "SELECT key, seq FROM relay_test_effects WHERE subscriber = $1 ORDER BY id", subscriber
    )
    by_key: dict[str, list[int]] = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append(row["seq"])
    return by_key


async def wait_until(
    check: Callable[[], Awaitable[Any]], seconds: float = 10.0, what: str = "condition"
) -> Any:
    """Poll `check` until it returns something truthy; fail after `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.02)


async def run_relays_until_settled(
    db: Database,
    build: Callable[[Database], System],
    *,
    relays: int = 3,
    pool_size: int = 6,
    concurrency: int = 6,
    seconds: float = 60.0,
) -> list[Relay]:
    """Run `relays` relays at once, each with its own pool (as separate processes would have),
    until no outbox row is pending: every row delivered, parked or blocked. Stops them all and
    returns them (their counters)."""
    pools = [await Database(db.url, max_size=pool_size).connect() for _ in range(relays)]
    running = [
        Relay(build(pool), instance_id=f"relay-{n}", concurrency=concurrency) for n, pool in enumerate(pools)
    ]
    try:
        for relay in running:
            relay.start()
        await wait_until(
            lambda: db.fetchval("SELECT NOT EXISTS (SELECT FROM outbox WHERE status = 'pending')"),
            seconds,
            "every row to be delivered, parked or blocked",
        )
    finally:
        for relay in running:
            await relay.stop()
        for pool in pools:
            await pool.close()
    return running


async def deliver_everything(relay: Relay, seconds: float = 10.0) -> None:
    """Drain until no row is pending or in flight (rows waiting for a backoff included)."""

    async def settled() -> bool:
        await relay.drain(seconds)
        left = await relay.db.fetchval("SELECT count(*) FROM outbox WHERE status = 'pending'")
        return left == 0

    await wait_until(settled, seconds, "the outbox to settle")


# -- the worker process -------------------------------------------------------------------------


class HangOnThirdCharge:
    """The fake payment provider, telling stdout of every attempt and hanging in the third."""

    async def charge(self, order_id, payment_method: str, idempotency_key: str, attempt: int = 1):
        print(f"charge {attempt}", flush=True)
        if attempt >= 3:
            await asyncio.Event().wait()
        return await fake_provider.charge(order_id, payment_method, idempotency_key, attempt=attempt)


class HangBeforeAck(Relay):
    async def _acknowledge(self, conn, ids) -> int:
        print("applied", flush=True)  # handlers ran; their transaction has not committed
        await asyncio.Event().wait()
        return 0


async def main(mode: str, instance_id: str) -> None:
    settings = Settings(
        database_url=os.environ["DATABASE_URL"],
        instance_id=instance_id,
        relay_poll_seconds=0.05,
        relay_lease_seconds=1.0,
        relay_handler_timeout=600.0,
        relay_batch_size=100,
    )
    db = await Database(settings.database_url, max_size=10).connect()
    if mode == "charge":
        settings = replace(settings, retry_base_seconds=0.001, retry_cap_seconds=0.01)
        gateway = HangOnThirdCharge()
        await Relay(bootstrap(settings, db, overrides={"payment_gateway": lambda: gateway})).run()
        return

    async def hang_on_second(event: TestEvent, envelope: Envelope) -> None:
        if event.seq == 2:
            print("claimed", flush=True)
            await asyncio.Event().wait()

    system = build_system(settings, db, [Subscription(SUBSCRIBER, recorder(hang_on_second))])
    relay_type = HangBeforeAck if mode == "settle" else Relay
    await relay_type(system, concurrency=100).run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
