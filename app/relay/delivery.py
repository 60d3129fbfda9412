"""Delivering one subscriber's claimed rows on one connection: fast runs (app/relay/fast.py)
until a handler fails, then carefully -- a savepoint per delivery -- with the acknowledgement in
the deliveries' own transaction."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import asyncpg
from opentelemetry import trace

from app import context, observe
from app.conflicts import retry_on_conflict
from app.messages import ConcurrencyError, PermanentError
from app.relay import fast
from app.relay.ack import held_all
from app.relay.policy import LeaseExpired, RetryPolicies
from app.relay.rows import call_one, decode_headers, open_row
from app.relay.settle import Outcome
from app.uow import UnitOfWork
from app.wiring import BatchItem

if TYPE_CHECKING:
    from app.bootstrap import System

log = logging.getLogger("app.relay")

# No inbox row per delivery: an effect commits only with its row's acknowledgement (app/relay/
# ack.py says why that makes it once). The inbox is still read for a redelivery -- a row whose
# earlier attempt ended without an outcome or failed (`last_error`, which a replay keeps) -- because
# relays before the lease-checked acknowledgement could commit an effect and its inbox row without
# the acknowledgement, and such rows may still be in a database; a first attempt cannot have been
# applied before, so the usual delivery reads nothing. The table stays for deliveries that come
# from outside the database (a message broker's consumer), which have no outbox row to
# acknowledge with their effects and need it to apply each message once.
APPLIED_BEFORE_SQL = """
SELECT message_id FROM inbox WHERE subscriber = $1 AND message_id = ANY($2::uuid[])
"""


async def applied_before(db, subscriber: str, rows: list) -> set:
    """The messages among `rows` that an earlier relay applied (see APPLIED_BEFORE_SQL): one read,
    and only if a row is a redelivery."""
    again = [r["message_id"] for r in rows if r["last_error"] is not None]
    if not again:
        return set()
    return {r[0] for r in await db.fetch(APPLIED_BEFORE_SQL, subscriber, again)}


# After a handler failure its subscriber is delivered carefully (a savepoint per delivery) for
# this long, so a subscriber that keeps failing does not keep re-running its good deliveries.
CAREFUL_SECONDS = 30.0
RUN_CONFLICT_RETRIES = 5  # a fast run that lost an optimistic-concurrency race is run again
DELIVERY_CONFLICT_RETRIES = 4  # a careful delivery that lost one decides again, in a new savepoint
GROUP_SIZE = 50


def groups(rows: list) -> list[list]:
    """Split a batch into delivery groups (one connection each, delivered in turn), one
    subscriber's rows together: a failing subscriber's fast run rolls back and re-runs only its
    own deliveries, never another subscriber's."""
    by_subscriber: dict[str, list] = {}
    for row in rows:
        by_subscriber.setdefault(row["subscriber"], []).append(row)
    return [
        rows[i : i + GROUP_SIZE] for rows in by_subscriber.values() for i in range(0, len(rows), GROUP_SIZE)
    ]


def _lost_race(error: BaseException) -> bool:
    return isinstance(error, fast.HandlerFailed) and isinstance(error.error, ConcurrencyError)


class Delivery:
    """One relay's deliveries: runs the handlers, acknowledges, and remembers which subscribers
    are delivered carefully for now."""

    def __init__(
        self,
        system: System,
        instance_id: str,
        handler_timeout: float,
        policies: RetryPolicies,
        acknowledge: Callable[[asyncpg.Connection, list[int]], Awaitable[int]],
    ) -> None:
        self.system, self.db, self.instance_id = system, system.db, instance_id
        self.acknowledge = acknowledge  # (conn, ids): `acknowledge` for this relay
        self.handler_timeout = handler_timeout
        self.policies = policies
        self.careful_until: dict[str, float] = {}  # subscriber -> delivered carefully until then
        self.delivered = 0

    async def group(self, rows: list, hold_seconds: float) -> list[Outcome]:
        """Deliver one subscriber's rows on one connection: optimistically several to a
        transaction without savepoints (`fast.run`, whose runs end once they have held their
        events `hold_seconds`); when a handler fails, the run rolls back and its rows go through
        `careful` (a savepoint each) -- except the failed one, whose error is its outcome -- and so
        does the subscriber for CAREFUL_SECONDS. A lost optimistic-concurrency race is no failure:
        the run is run again."""
        subscriber = rows[0]["subscriber"]
        if self.careful_until.get(subscriber, 0.0) > time.monotonic():
            return await self.careful(rows)
        outcomes: list[Outcome] = []
        left = rows  # not yet delivered

        async def runs() -> None:
            # A stream changed under a handler (e.g. POST /orders reserved the same stock) rolls
            # the run back: retried from the first row it had not delivered, on fresh state.
            nonlocal left
            while left:
                done, left = await fast.run(self, subscriber, left, seen, hold_seconds)
                outcomes.extend(done)

        try:
            seen = await applied_before(self.db, subscriber, rows)
            await retry_on_conflict(runs, retries=RUN_CONFLICT_RETRIES, conflict=_lost_race)
        except fast.BatchFailed as failed:  # each of the run's rows on its own now: the failing one isolates
            self.careful_until[subscriber] = time.monotonic() + CAREFUL_SECONDS
            if len(left) == 1:  # a lone row's failure is its own: running it again would repeat its attempt
                outcomes.append(Outcome(left[0], failed.error, failed.seconds))
            else:
                outcomes += await self.careful(left)
        except fast.HandlerFailed as failed:
            i, error = failed.index, failed.error
            self.careful_until[subscriber] = time.monotonic() + CAREFUL_SECONDS
            if isinstance(error, ConcurrencyError):  # careful retries it on fresh state
                outcomes += await self.careful(left[: i + 1])
            else:
                outcomes += await self.careful(left[:i])
                outcomes.append(Outcome(left[i], error, failed.seconds))
            outcomes += await self.careful(left[i + 1 :])
        except Exception as error:  # the run's own statements failed: nothing of it happened
            log.info("relay %s: fast delivery failed, delivering one by one: %s", self.instance_id, error)
            outcomes += await self.careful(left)
        return outcomes

    async def careful(self, rows: list) -> list[Outcome]:
        """Deliver rows one savepoint each, so a failure undoes only that one; the
        acknowledgements in the same transaction; one COMMIT for the lot (and one after each
        delivery that appended events)."""
        if not rows:
            return []
        started = time.perf_counter()
        outcomes: list[Outcome] = []
        durable = 0  # outcomes[:durable] are committed
        uow = self.system.uow()
        try:
            seen = await applied_before(self.db, rows[0]["subscriber"], rows)
            async with uow:
                conn = await uow.transaction()
                done: list[int] = []
                for i, row in enumerate(rows):
                    outcome, appended = await self._deliver(uow, conn, row, row["message_id"] in seen)
                    outcomes.append(outcome)
                    if outcome.error is None:
                        done.append(row["id"])
                    if appended or i == len(rows) - 1:
                        acknowledged = await self.acknowledge(conn, done)
                        held_all(acknowledged, done)
                        await uow.commit()
                        self.delivered += acknowledged
                        durable, done = len(outcomes), []
                        if i < len(rows) - 1:
                            conn = await uow.transaction()
        except Exception as error:  # the open transaction failed: what it held did not happen
            log.warning("relay %s: a delivery transaction failed: %s", self.instance_id, error)
            failed = [Outcome(row, error, time.perf_counter() - started) for row in rows[durable:]]
            return outcomes[:durable] + failed
        return outcomes

    async def _deliver(self, uow: UnitOfWork, conn: asyncpg.Connection, row, seen: bool) -> tuple[Outcome, bool]:
        """One delivery in a savepoint (`seen`: applied before, just acknowledge it). Returns its
        outcome and whether it appended events."""
        started = time.perf_counter()
        bound = self.system.subscriptions.get(row["subscriber"])
        if seen:
            return Outcome(row, None, 0.0), False
        try:
            async with asyncio.timeout(self.handler_timeout):
                appended = await retry_on_conflict(
                    self._attempt, uow, conn, bound, row, retries=DELIVERY_CONFLICT_RETRIES
                )
            return Outcome(row, None, time.perf_counter() - started), appended
        except Exception as error:
            return Outcome(row, error, time.perf_counter() - started), False

    async def _attempt(self, uow: UnitOfWork, conn: asyncpg.Connection, bound, row) -> bool:
        """One try of a delivery, in a SAVEPOINT (a failure undoes this delivery only) and with a
        unit of its own (a retry decides again on fresh state). Returns whether it appended."""
        child = uow.child()
        async with conn.transaction():
            await self.apply(bound, child, row)
        return bool(child.positions)

    async def apply(self, bound, uow: UnitOfWork, row) -> None:
        """Run the row's handler with `uow` (decoded event, envelope, correlation context); a
        batch subscription's with a one-item batch."""
        self._check(bound, row)
        event, envelope, headers = open_row(self.system.catalog, row)
        with observe.Delivery(row, headers):  # its log fields, its span (parent: the event's), its debug line
            await call_one(bound, event, envelope, uow)

    async def apply_batch(self, bound, uow: UnitOfWork, rows: list) -> None:
        """Run a batch subscription's handler once for `rows`. One log scope, span and debug line
        for the batch -- the first row's, with every row's outbox and message id on the span --
        not one per row: per-row ones would cost what batching saves. The correlation context is
        the first row's too, except inside an item's `recording()`."""
        items = []
        for row in rows:
            self._check(bound, row)
            event, envelope, _ = open_row(self.system.catalog, row)
            items.append(BatchItem(event, envelope))
        first = items[0].envelope
        context.correlation_id.set(first.headers.get("correlation_id"))
        context.causation_id.set(str(first.message_id))
        with observe.Delivery(rows[0], decode_headers(rows[0]["headers"])):
            if observe.TRACING:
                span = trace.get_current_span()
                span.set_attribute("switchboard.batch.outbox_ids", [r["id"] for r in rows])
                span.set_attribute("switchboard.batch.message_ids", [str(r["message_id"]) for r in rows])
            await bound.handler(items, uow=uow, envelope=None)

    def _check(self, bound, row) -> None:
        if bound is None or bound.handler is None:
            raise PermanentError(f"no subscription named {row['subscriber']!r} is hosted here")
        if row["attempts"] > self.policies[row["subscriber"]].max_attempts:  # see RetryPolicy
            raise LeaseExpired(f"gave up: {row['attempts'] - 1} attempts ended without an outcome")


