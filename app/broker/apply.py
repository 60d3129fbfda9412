"""What a batch of JetStream messages does in the consuming database. JetStream is a transport:
once a message reaches this database, this database's own machinery owns it.

Taking a message is an inbox row under the broker's name for its subscriber (`taken_name`), never
the plain subscriber name: the relay reads the plain name's rows for its redeliveries
(app/relay/delivery.py) and would skip a message handed to the outbox. A message already taken is
a redelivery: nothing to do. A taken message is applied in the same transaction -- or, if its key
has undelivered rows of the subscriber in the outbox (a retry, a dead letter and what waits behind
it), it joins them as a pending row, so the key's order holds. A batch runs in one transaction
(`fast`); a handler that raises rolls it back and the batch runs again one transaction per message
(`careful`): the failing message is handed to the outbox -- retried, dead-lettered, compensated
and replayed by the local relay like any outbox row -- so a failure never goes back to JetStream
and never holds the partition. Careful also commits each message on its own so that a message
that kills the process is the first one not taken when its batch comes back: only that one is
charged the deliveries that ended without an outcome (LeaseExpired, as the relay's rows are)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from app import observe, relay
from app.conflicts import retry_on_conflict
from app.messages import ConcurrencyError, PermanentError
from app.relay.policy import LeaseExpired, RetryPolicies
from app.relay.rows import call_one, open_row
from app.relay.settle import Outcome, settle

if TYPE_CHECKING:
    from app.bootstrap import System

TAKE_SQL = "INSERT INTO inbox (subscriber, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING 1"
TAKE_MANY_SQL = """
INSERT INTO inbox (subscriber, message_id) SELECT $1, unnest($2::uuid[])
ON CONFLICT DO NOTHING RETURNING message_id
"""
UNTAKE_SQL = "DELETE FROM inbox WHERE subscriber = $1 AND message_id = ANY($2::uuid[])"
QUEUED_KEYS_SQL = """
SELECT DISTINCT partition_key FROM outbox
WHERE subscriber = $1 AND partition_key = ANY($2::text[]) AND status <> 'delivered'
"""
_COLUMNS = "message_id, position, subscriber, type, partition_key, payload, headers"
_VALUES = "$1, $2, $3, $4, $5, $6::jsonb, $7::jsonb"
_NEW = "ON CONFLICT (subscriber, message_id) WHERE status <> 'delivered' DO NOTHING"
# A pending row behind the key's undelivered ones: the relay's claim holds it back until every
# earlier row of its key is delivered, so a parked key stays parked for messages from the broker too.
QUEUE_SQL = f"INSERT INTO outbox ({_COLUMNS}) VALUES ({_VALUES}) {_NEW}"
QUEUE_BEHIND_SQL = f"""
INSERT INTO outbox ({_COLUMNS}) SELECT {_VALUES}
WHERE EXISTS (SELECT 1 FROM outbox WHERE subscriber = $3 AND partition_key = $5 AND status <> 'delivered')
{_NEW} RETURNING 1
"""
# A failed message as the outbox row of a failed first attempt: the relay retries it after the delay.
HAND_OVER_SQL = f"""
INSERT INTO outbox ({_COLUMNS}, attempts, available_at, last_error, first_failed_at)
VALUES ({_VALUES}, 1, now() + make_interval(secs => $8), $9, now()) {_NEW}
"""
# For a message that failed for good: the row leased to this consumer so that no relay claims it
# before settle() parks it (with its compensation) once this transaction committed.
PARK_ROW_SQL = f"""
INSERT INTO outbox ({_COLUMNS}, attempts, locked_by, locked_until, first_failed_at)
VALUES ({_VALUES}, $8, $9, now() + make_interval(secs => $10), now()) {_NEW}
RETURNING id, message_id, position, subscriber, type, payload, headers, attempts, 0.0::float8 AS age
"""
CONFLICT_RETRIES = 4  # a batch or message that lost an optimistic-concurrency race decides again


def taken_name(subscriber: str) -> str:
    """The inbox name of the messages this database took from the broker for `subscriber`."""
    return f"broker:{subscriber}"


class HandlerFailed(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


def _lost_race(error: BaseException) -> bool:
    return isinstance(error, HandlerFailed) and isinstance(error.error, ConcurrencyError)


class Applier:
    """One subscriber's batches in this database (see the module's docstring)."""

    def __init__(self, system: System, subscriber: str, bound, instance_id: str) -> None:
        settings = system.settings
        self.system, self.subscriber, self.bound, self.instance_id = system, subscriber, bound, instance_id
        self.taken = taken_name(subscriber)
        self.policies = RetryPolicies(system.subscriptions, settings)
        self.handler_timeout = settings.relay_handler_timeout
        self.lease_seconds = settings.relay_lease_seconds
        self.applied = 0  # handlers run to a commit
        self.handed_over = 0  # failures given to the outbox (retry or dead letter)

    async def apply(self, rows: list[dict[str, Any]]) -> None:
        """The batch, fast if it is a first delivery, else (or after a handler failure) carefully."""
        left = rows
        if rows[0]["attempts"] == 1:
            try:
                while left:
                    left = await retry_on_conflict(self.fast, left, retries=CONFLICT_RETRIES, conflict=_lost_race)
                return
            except HandlerFailed:
                pass
        await self.careful(left)

    async def fast(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages in one transaction, in stream order; raises HandlerFailed (rolled back).
        Like the relay's fast runs, it commits early once it has held recorded events for
        RUN_HOLD_SECONDS (another writer of those streams, e.g. POST /orders reserving stock,
        waits on them until then): the rest are given back (their taken-rows deleted) and returned."""
        uow, applied, queued_any, left = self.system.uow(), 0, False, []
        hold, began = relay.RUN_HOLD_SECONDS, None
        async with uow:
            conn = await uow.transaction()
            fresh = {r[0] for r in await conn.fetch(TAKE_MANY_SQL, self.taken, [r["message_id"] for r in rows])}
            todo = [row for row in rows if row["message_id"] in fresh]
            keys = list({row["partition_key"] for row in todo})
            queued = {r[0] for r in await conn.fetch(QUEUED_KEYS_SQL, self.subscriber, keys)} if keys else set()
            for row in todo:
                if row["partition_key"] in queued:
                    await conn.execute(QUEUE_SQL, *self.columns(row))
                    queued_any = True
                    continue
                child = uow.child()
                try:
                    async with asyncio.timeout(self.handler_timeout):
                        await self.run(child, row)
                except Exception as error:
                    raise HandlerFailed(error) from error
                applied += 1
                began = began if began is not None or not child.positions else time.perf_counter()
                if began is not None and time.perf_counter() - began >= hold and row is not todo[-1]:
                    left = todo[todo.index(row) + 1 :]
                    await conn.execute(UNTAKE_SQL, self.taken, [r["message_id"] for r in left])
                    break
            await uow.commit()
        self.applied += applied
        if queued_any:
            self.system.db.outbox_written()  # this process's relay delivers them in turn
        return left

    async def careful(self, rows: list[dict[str, Any]]) -> None:
        """One transaction per message, its handler in a savepoint; a failure is handed over."""
        parked: list[Outcome] = []
        first = True
        for row in rows:
            uow = self.system.uow()
            async with uow:
                conn = await uow.transaction()
                if not await conn.fetchval(TAKE_SQL, self.taken, row["message_id"]):
                    continue  # taken before: a redelivery
                charged, first = first, False
                if await conn.fetchval(QUEUE_BEHIND_SQL, *self.columns(row)):
                    await uow.commit()
                    self.system.db.outbox_written()
                    continue
                error = await self._attempt(uow, conn, row, charged)
                if error is not None:
                    parked += await self.hand_over(conn, row, error)
                await uow.commit()
            if error is None:
                self.applied += 1
            else:
                self.handed_over += 1
                self.system.db.outbox_written()
        if parked:
            await settle(self.system, parked, self.policies, self.instance_id)

    async def _attempt(self, uow, conn, row: dict, charged: bool) -> BaseException | None:
        policy = self.policies[self.subscriber]
        if charged and row["attempts"] > policy.max_attempts:  # earlier deliveries died with it
            return LeaseExpired(f"gave up: {row['attempts'] - 1} deliveries ended without an outcome")

        async def once() -> None:
            async with conn.transaction():  # a savepoint: a failure undoes this message's effects only
                await self.run(uow.child(), row)

        try:
            async with asyncio.timeout(self.handler_timeout):
                await retry_on_conflict(once, retries=CONFLICT_RETRIES)
        except Exception as error:
            return error
        return None

    async def hand_over(self, conn, row: dict, error: BaseException) -> list[Outcome]:
        """The failed message as an outbox row of its subscriber: a retry, or a dead letter to park."""
        if isinstance(error, (PermanentError, LeaseExpired)):
            attempts = max(1, min(row["attempts"], self.policies[self.subscriber].max_attempts))
            parked = await conn.fetchrow(
                PARK_ROW_SQL, *self.columns(row), attempts, self.instance_id, self.lease_seconds
            )
            return [Outcome(parked, error)] if parked is not None else []
        summary = f"{type(error).__name__}: {error}"[:2000]
        delay = self.policies[self.subscriber].delay(1)
        await conn.execute(HAND_OVER_SQL, *self.columns(row), delay, summary)
        return []

    async def run(self, uow, row: dict) -> None:
        event, envelope, headers = open_row(self.system.catalog, row)
        with observe.Delivery(row, headers):
            await call_one(self.bound, event, envelope, uow)

    def columns(self, row: dict) -> tuple:
        """The outbox columns of the message: id, position, subscriber, type, key, payload, headers."""
        return (row["message_id"], row["position"], self.subscriber, row["type"], row["partition_key"],
                row["payload"].decode(), row["headers"].decode())  # fmt: skip
