"""The relay: claims due outbox rows and delivers them to their subscribers with their inbox rows,
acknowledging in the same transaction -- a run of one subscriber's deliveries per transaction
(fast path), or a savepoint per delivery after a handler failure (careful path) -- retries with
backoff, or dead-letters.

Guarantees (docs/ARCHITECTURE.md has the why):
- a row is claimed by one live relay at a time (FOR UPDATE SKIP LOCKED + a lease);
- only the relay that still holds a row's lease acknowledges, retries or dead-letters it;
- per (subscriber, partition key) rows are delivered in id order, one at a time, also across
  retries and dead letters (a row is claimable only when no earlier row of its key is undelivered);
- every failure ends in a retry (available_at, attempts, last_error) or in dead_letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import traceback
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from prometheus_client import Counter, Histogram

from app import context
from app.bootstrap import System
from app.db import OUTBOX_CHANNEL
from app.messages import ConcurrencyError, PermanentError
from app.uow import UnitOfWork
from app.wiring import Envelope

log = logging.getLogger(__name__)

DELIVERED = Counter("switchboard_relay_delivered_total", "Outbox rows delivered", ["subscriber"])
FAILED = Counter("switchboard_relay_failures_total", "Failed deliveries", ["subscriber", "outcome"])
YIELDED = Counter(
    "switchboard_relay_yielded_groups_total",
    "Delivery groups run one at a time because commands or queries were in flight",
)
LAG = Histogram(
    "switchboard_relay_lag_seconds",
    "Commit-to-handler lag of delivered rows",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

# A claimed row stays 'pending' and gets a lease (locked_by, locked_until): no indexed column
# changes, so the claim is a HOT update (no index entries; the table's fillfactor leaves room on
# the page) -- it was the relay's costliest statement as a status change. A row is claimable when
# due and not leased, or when its lease expired (its relay died or stalled): such a claim records
# why the earlier attempt ended without an outcome. Per key, a row waits until every earlier
# row of its key is delivered (leased rows hold their key's later rows back).
CLAIM_SQL = """
WITH due AS (
    SELECT o.id FROM outbox o
    WHERE o.status = 'pending' AND o.available_at <= now() AND o.subscriber = ANY($1::text[])
      AND (o.locked_until IS NULL OR o.locked_until < now())
      AND NOT EXISTS (
          SELECT 1 FROM outbox p
          WHERE p.subscriber = o.subscriber AND p.partition_key = o.partition_key AND p.id < o.id
            AND p.status <> 'delivered')
    ORDER BY o.id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox o
SET attempts = o.attempts + 1, locked_by = $3, locked_until = now() + make_interval(secs => $4),
    last_error = CASE WHEN o.locked_until IS NULL THEN o.last_error
                      ELSE 'lease expired: relay ' || o.locked_by || ' stopped without an outcome' END,
    first_failed_at = CASE WHEN o.locked_until IS NULL THEN o.first_failed_at
                           ELSE coalesce(o.first_failed_at, now()) END
FROM due WHERE o.id = due.id
RETURNING o.id, o.message_id, o.position, o.subscriber, o.type, o.payload, o.headers, o.attempts,
          extract(epoch FROM now() - o.created_at) AS age
"""

EXTEND_SQL = """
UPDATE outbox SET locked_until = now() + make_interval(secs => $3)
WHERE id = ANY($1::bigint[]) AND locked_by = $2 AND status = 'pending'
"""

# Settling touches only rows this relay still holds: if its lease lapsed and another relay took a
# row over, that relay's outcome stands (a stale retry or dead letter would overwrite it; a stale
# ack is not needed: the inbox makes the new holder acknowledge without running the handler).
# For the claim's transaction only, in one round trip:
# - synchronous_commit off: a claim is a lease marker; if a crash loses it, its rows are simply
#   claimable again (the inbox absorbs the redelivery), and the acknowledgement's durable commit
#   flushes it anyway. So its COMMIT does not wait for the WAL flush, which the handlers (and
#   the commit-to-handler lag) would otherwise wait on.
# - no bitmap scans, no sorts: the claim must walk outbox_due in id order and stop at LIMIT. A
#   queue table's statistics are always stale; with a freshly filled outbox the planner, thinking
#   one row matches, bitmap-scanned every pending row, checked each one's key and sorted them
#   (measured: 76 ms and 28,785 buffers for 200 rows, against 8 ms in id order).
CLAIM_SETTINGS = """
SELECT set_config('synchronous_commit', 'off', true), set_config('enable_bitmapscan', 'off', true),
       set_config('enable_sort', 'off', true)
"""

RETRY_SQL = """
UPDATE outbox o SET locked_by = NULL, locked_until = NULL,
    available_at = now() + make_interval(secs => f.delay), last_error = f.error,
    first_failed_at = coalesce(o.first_failed_at, now())
FROM unnest($1::bigint[], $2::float8[], $3::text[]) AS f(id, delay, error)
WHERE o.id = f.id AND o.locked_by = $4 AND o.status = 'pending'
"""

# Handing rows back (graceful stop, or the batch was cancelled): the attempt never reached an
# outcome and its transaction rolled back, so it does not count against max_attempts.
RELEASE_SQL = """
UPDATE outbox SET locked_by = NULL, locked_until = NULL, attempts = greatest(attempts - 1, 0)
WHERE id = ANY($1::bigint[]) AND locked_by = $2 AND status = 'pending'
"""

# Park the row as a dead letter and park its key's later rows behind it (ordered dead-lettering).
DEAD_LETTER_SQL = """
WITH dead AS (
    UPDATE outbox SET status = 'dead', locked_by = NULL, locked_until = NULL, last_error = $2,
        first_failed_at = coalesce(first_failed_at, now())
    WHERE id = $1 AND locked_by = $7 AND status = 'pending'
    RETURNING *
), letter AS (
    INSERT INTO dead_letters (outbox_id, message_id, position, subscriber, type, partition_key, payload,
        headers, attempts, error_type, error_message, error_traceback, first_failed_at, last_failed_at)
    SELECT id, message_id, position, subscriber, type, partition_key, payload, headers, attempts,
        $3, $4, $5, first_failed_at, now()
    FROM dead
    RETURNING id, outbox_id, subscriber, partition_key
), history AS (
    INSERT INTO dead_letter_history (dead_letter_id, action, actor) SELECT id, 'parked', $6 FROM letter
), parked AS (
    UPDATE outbox o SET status = 'blocked', blocked_by = letter.id
    FROM letter
    WHERE o.subscriber = letter.subscriber AND o.partition_key = letter.partition_key
      AND o.id > letter.outbox_id AND o.status = 'pending'
)
SELECT id FROM letter
"""

# Delivered rows stay visible (status 'delivered', delivered_at) for SWITCHBOARD_OUTBOX_RETENTION
# seconds, then go in small batches; claims never look at them (partial indexes).
PURGE_SQL = """
DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox WHERE status = 'delivered' AND delivered_at < now() - make_interval(secs => $1)
    LIMIT $2
    FOR UPDATE SKIP LOCKED  -- every relay purges: never wait on another's batch
)
"""
PURGE_BATCH = 5000
PURGE_ROUNDS = 20

# In the delivery's savepoint: a row comes back if the message is new to this subscriber; a
# failed delivery rolls its inbox row back with its effects.
INBOX_SQL = "INSERT INTO inbox (subscriber, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING 1"

# The fast path reads which of a group's messages its subscriber has applied before, once, and
# writes the inbox rows of a run together with its acknowledgement (the careful path writes each
# inbox row in its delivery's savepoint and acknowledges with none). A concurrent relay that
# applied one of them meanwhile (a lapsed lease) makes the INSERT fail: the run rolls back and is
# delivered carefully, where the per-delivery inbox check skips it.
INBOX_SEEN_SQL = """
SELECT message_id FROM inbox WHERE subscriber = $1 AND message_id = ANY($2::uuid[])
"""

# The acknowledgement also makes its transaction commit without waiting for the WAL flush
# (`synchronous_commit off` for this transaction only: a one-time filter, evaluated once before
# any row). A delivery's transaction only derives state from an outbox row that is already
# durable, and holds the effects, the inbox rows, the new events and the ack together; a crash
# of PostgreSQL can lose the last ones committed (up to 3 x wal_writer_delay), whole -- never
# part of one -- and their rows are then simply pending again and delivered again. Anything that
# depended on a lost delivery is lost with it: the WAL is flushed in order, so a later flushed
# commit flushes every earlier one. Measured: without this, P1's database sessions spent most of
# their time queued on the WAL flush (LWLock:WALWrite 1.35 + IO:WalSync 0.58 of 2.6 active).
ACK_WITH_INBOX_SQL = """
WITH seen AS (
    INSERT INTO inbox (subscriber, message_id) SELECT $3, unnest($4::uuid[])
)
UPDATE outbox SET status = 'delivered', delivered_at = now(), locked_by = NULL, locked_until = NULL
WHERE id = ANY($1::bigint[]) AND locked_by = $2 AND status = 'pending'
  AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'
"""


def backoff_delay(attempt: int, base: float, cap: float, rand=random.random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^(attempt-1)))."""
    return rand() * min(cap, base * 2 ** max(attempt - 1, 0))


# After a handler failure its subscriber is delivered carefully (a savepoint per delivery) for
# this long, so a subscriber that keeps failing does not keep re-running its good deliveries.
CAREFUL_SECONDS = 30.0
RUN_CONFLICT_RETRIES = 5  # a fast run that lost an optimistic-concurrency race is run again
RUN_HOLD_SECONDS = 0.005  # a run whose handlers recorded events appends them once it has run this long


class _HandlerFailed(Exception):
    """A handler failed in a fast run (which then rolled back): which row of the rows the group
    had left when the run began, why, after how long."""

    def __init__(self, index: int, error: BaseException, seconds: float) -> None:
        self.index, self.error, self.seconds = index, error, seconds


class LeaseExpired(Exception):
    """Earlier attempts ended without an outcome (the relay holding the row died)."""


@dataclass
class _Batch:
    rows: list
    ids: list[int]
    keeper: asyncio.Task  # extends the rows' leases until they are settled
    claimed_at: float = 0.0  # time.monotonic() at the claim

    def age(self, row) -> float:
        """Seconds since the row was committed: its age at the claim, plus the time since."""
        return float(row["age"]) + time.monotonic() - self.claimed_at


@dataclass
class Outcome:
    row: Any
    error: BaseException | None = None
    seconds: float = 0.0


class Relay:
    def __init__(
        self,
        system: System,
        *,
        instance_id: str | None = None,
        subscribers: list[str] | None = None,
        concurrency: int | None = None,
    ) -> None:
        settings = system.settings
        self.system = system
        self.db = system.db
        self.instance_id = instance_id or settings.instance_id
        self.subscribers = subscribers if subscribers is not None else system.hosted_subscribers
        self.batch_size = settings.relay_batch_size
        self.poll_seconds = settings.relay_poll_seconds
        self.lease_seconds = settings.relay_lease_seconds
        self.handler_timeout = settings.relay_handler_timeout
        self.retention_seconds = settings.outbox_retention_seconds
        self.yield_seconds = settings.relay_yield_seconds
        self.linger_seconds = settings.relay_linger_seconds
        self._turns = asyncio.Condition()  # groups that yield to the synchronous path take turns
        self._yielder_running = False
        self.concurrency = concurrency or max(2, system.db.max_size // 2)
        self._limit = asyncio.Semaphore(self.concurrency)
        self.delivered = 0
        self._wake = asyncio.Event()
        self._unsubscribe = system.db.on_outbox_written(self._wake.set)  # commits in this process
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._listener: asyncpg.Connection | None = None
        self._careful_until: dict[str, float] = {}  # subscriber -> delivered carefully until then

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> asyncio.Task:
        self._task = asyncio.create_task(self.run(), name=f"relay {self.instance_id}")
        return self._task

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming, finish the batches in hand (bounded by `grace`), release what is left."""
        self._stopping = True
        self._unsubscribe()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    async def run(self) -> None:
        """Claim a batch and hand it to delivery, then claim the next at once if the batch was
        full, or on a wake-up (or after the poll interval) if not, while earlier batches are still
        in their handlers or their commits: up to BATCHES_IN_FLIGHT at a time. So rows committed
        during a delivery are claimed without waiting for it (lag), and the database works on a
        claim while this process runs handlers (throughput).

        Never two claims at once: concurrent claims take the same head of the queue and the loser
        re-checks every row the winner took (measured with two claim loops: claims 8x slower, P1
        capacity 750 -> 375 req/s). Per-key order holds across batches: a row in flight holds
        back its key's later rows."""
        in_flight: set[asyncio.Task] = set()
        purger = asyncio.create_task(self._purge_forever())
        try:
            while not self._stopping:
                claimed = 0
                try:
                    await self._ensure_listener()
                    if len(in_flight) >= BATCHES_IN_FLIGHT:
                        await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    batch = await self._claim()
                    if batch is not None:
                        claimed = len(batch.rows)
                        task = asyncio.create_task(self._deliver_batch(batch))
                        in_flight.add(task)
                        task.add_done_callback(self._delivered_batch(in_flight))
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                    log.warning("relay %s: database error, retrying: %s", self.instance_id, error)
                if claimed < self.batch_size and not self._stopping:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                    self._wake.clear()
                    if self.linger_seconds > 0 and not self._stopping:
                        # batch the rows of the commits that follow this one (see Settings)
                        await asyncio.sleep(self.linger_seconds)
            if in_flight:  # a graceful stop: finish the batches in hand (stop() bounds the wait)
                await asyncio.wait(in_flight)
        finally:
            purger.cancel()
            for task in in_flight:  # cancelled: each hands its unsettled rows back
                task.cancel()
            if in_flight:
                await asyncio.wait(in_flight)
            if self._listener is not None:
                with contextlib.suppress(Exception):
                    await self._listener.close()

    async def purge_delivered(self, rounds: int = PURGE_ROUNDS) -> int:
        """Delete delivered rows older than the retention period, PURGE_BATCH at a time (short
        statements), until none are left or `rounds` batches went. Returns how many went."""
        purged = 0
        for _ in range(rounds):
            deleted = _rowcount(await self.db.execute(PURGE_SQL, self.retention_seconds, PURGE_BATCH))
            purged += deleted
            if deleted < PURGE_BATCH:
                break
        return purged

    async def _purge_forever(self) -> None:
        """Once a second: up to PURGE_ROUNDS x PURGE_BATCH rows a second, far above what the relay
        delivers, so the table does not grow past the retention period."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.purge_delivered()
            except Exception as error:  # keep purging: a purge that died would let the table grow
                log.warning("relay %s: could not purge delivered rows: %s", self.instance_id, error)

    def _delivered_batch(self, in_flight: set[asyncio.Task]):
        def done(task: asyncio.Task) -> None:
            in_flight.discard(task)
            if not task.cancelled() and task.exception() is not None:
                # its rows went back to pending (or stay leased until the lease lapses)
                log.warning("relay %s: a batch failed to settle: %s", self.instance_id, task.exception())

        return done

    async def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.is_closed():
            self._listener = await asyncpg.connect(self.db.url)
            await self._listener.add_listener(OUTBOX_CHANNEL, lambda *_: self._wake.set())

    async def drain(self, timeout: float = 30.0) -> int:
        """Deliver until nothing is due (rows waiting for a later retry stay). For tests and tools."""
        delivered = 0
        async with asyncio.timeout(timeout):
            while claimed := await self.run_once():
                delivered += claimed
        return delivered

    # -- one cycle -------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim one batch, deliver it, settle every row. Returns how many rows were claimed."""
        batch = await self._claim()
        if batch is None:
            return 0
        await self._deliver_batch(batch)
        return len(batch.rows)

    async def _claim(self) -> _Batch | None:
        """Claim due rows; their leases are kept from now until the batch is settled."""
        if not self.subscribers:
            return None
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute(CLAIM_SETTINGS)
            rows = await conn.fetch(
                CLAIM_SQL, self.subscribers, self.batch_size, self.instance_id, self.lease_seconds
            )
        if not rows:
            return None
        ids = [r["id"] for r in rows]
        return _Batch(rows, ids, asyncio.create_task(self._keep_leases(ids)), time.monotonic())

    async def _deliver_batch(self, batch: _Batch) -> None:
        """Deliver a batch, each subscriber's rows on a connection of their own, and settle them.
        If this is interrupted, every row not settled goes back without spending its attempt."""
        try:

            async def bounded(group):
                async with self._limit, self._turn(batch, group[0]):
                    return await self._deliver_group(group)

            groups = await asyncio.gather(*map(bounded, _groups(batch.rows)))
            await self._settle([o for group in groups for o in group])
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.db.execute(RELEASE_SQL, batch.ids, self.instance_id))
            raise
        finally:
            batch.keeper.cancel()

    def _yields(self, batch: _Batch, oldest) -> bool:
        """Whether a group yields to the synchronous path: commands or queries are in flight in
        this process, and the group's oldest row is younger than `relay_yield_seconds` (the async
        side's lag budget under load). Yielding groups are delivered one at a time, so a burst of
        requests keeps the CPU and the outbox absorbs the async work; a backlog older than the
        budget is delivered at full speed, whatever the load, and then the requests share."""
        mediator = getattr(self.system, "mediator", None)
        return mediator is not None and mediator.in_flight > 0 and batch.age(oldest) < self.yield_seconds

    @contextlib.asynccontextmanager
    async def _turn(self, batch: _Batch, oldest):
        """Around a group's delivery: while it yields, wait until no other yielding group is being
        delivered, and hand the turn on when done. Waiters look again each time a turn ends, so
        a group goes at full speed as soon as the requests are gone or its rows outgrow the
        budget -- a backlog queued during a burst is not delivered one group at a time after it."""
        async with self._turns:
            while self._yields(batch, oldest) and self._yielder_running:
                await self._turns.wait()
            mine = self._yields(batch, oldest)
            if mine:
                self._yielder_running = True
                YIELDED.inc()
        try:
            yield
        finally:
            if mine:
                async with self._turns:
                    self._yielder_running = False
                    self._turns.notify_all()

    async def _keep_leases(self, ids: list[int]) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.db.execute(EXTEND_SQL, ids, self.instance_id, self.lease_seconds)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                # keep trying: a keeper that died here would let the lease lapse mid-batch
                log.warning("relay %s: could not extend leases: %s", self.instance_id, error)

    async def _deliver_group(self, rows: list) -> list[Outcome]:
        """Deliver one subscriber's rows on one connection: optimistically several to a
        transaction without savepoints (`_deliver_run`); when a handler fails, the run rolls back
        and its rows go through `_deliver_careful` (a savepoint each) -- except the failed one,
        whose error is its outcome -- and so does the subscriber for CAREFUL_SECONDS. A lost
        optimistic-concurrency race is no failure: the run is run again."""
        subscriber = rows[0]["subscriber"]
        if self._careful_until.get(subscriber, 0.0) > time.monotonic():
            return await self._deliver_careful(rows)
        outcomes: list[Outcome] = []
        try:
            seen = {
                r[0] for r in await self.db.fetch(INBOX_SEEN_SQL, subscriber, [r["message_id"] for r in rows])
            }
            conflicts = 0
            while rows:
                try:
                    done, rows = await self._deliver_run(subscriber, rows, seen)
                except _HandlerFailed as failed:
                    if not isinstance(failed.error, ConcurrencyError) or conflicts == RUN_CONFLICT_RETRIES:
                        raise
                    # A stream changed under a handler (e.g. POST /orders reserved the same
                    # stock): not a failure. The run rolled back; run it again on fresh state.
                    conflicts += 1
                    await asyncio.sleep(random.uniform(0, 0.002 * conflicts))
                    continue
                outcomes += done
        except _HandlerFailed as failed:
            i, error = failed.index, failed.error
            self._careful_until[subscriber] = time.monotonic() + CAREFUL_SECONDS
            if isinstance(error, ConcurrencyError):  # careful retries it on fresh state
                outcomes += await self._deliver_careful(rows[: i + 1])
            else:
                outcomes += await self._deliver_careful(rows[:i])
                outcomes.append(Outcome(rows[i], error, failed.seconds))
            outcomes += await self._deliver_careful(rows[i + 1 :])
        except Exception as error:  # the run's own statements failed: nothing of it happened
            log.info("relay %s: fast delivery failed, delivering one by one: %s", self.instance_id, error)
            outcomes += await self._deliver_careful(rows)
        return outcomes

    async def _deliver_run(self, subscriber: str, rows: list, seen: set) -> tuple[list[Outcome], list]:
        """The fast path: the handlers in turn in one transaction, sharing one identity map and
        writing nothing themselves; then the inbox rows and the acknowledgement in one statement,
        every event the handlers recorded in one append (with the rows they staged), one COMMIT.
        Once a handler has recorded events, the run ends as soon as it has taken
        RUN_HOLD_SECONDS, returning the rest: its decisions rest on the streams it loaded, and the
        longer they wait for the append, the likelier another writer (e.g. POST /orders reserving
        stock) changed one first. A handler error -- or a lost race at the append -- rolls the
        whole run back and raises `_HandlerFailed`."""
        outcomes: list[Outcome] = []
        applied: list = []
        bound = self.system.subscriptions.get(subscriber)
        uow = self.system.uow()
        began = time.perf_counter()
        decided = False  # some handler recorded events: they wait for the run's append
        async with uow:
            await uow.transaction()
            for i, row in enumerate(rows):
                started = time.perf_counter()
                if row["message_id"] not in seen:  # else applied before: just acknowledge
                    child = uow.child(deferred=True)
                    try:
                        async with asyncio.timeout(self.handler_timeout):
                            await self._apply(bound, child, row)
                    except Exception as error:
                        raise _HandlerFailed(i, error, time.perf_counter() - started) from error
                    applied.append(row["message_id"])
                    outcomes.append(Outcome(row, None, time.perf_counter() - started))
                    decided = decided or child.deferred_events
                    if decided and time.perf_counter() - began >= RUN_HOLD_SECONDS:
                        break
                else:
                    outcomes.append(Outcome(row, None, time.perf_counter() - started))
            acknowledged = await self._acknowledge(
                uow.connection, [o.row["id"] for o in outcomes], subscriber, applied
            )
            try:
                await uow.commit()  # the run's events, its staged rows, COMMIT
            except ConcurrencyError as error:  # a stream changed since a handler loaded it
                raise _HandlerFailed(len(outcomes) - 1, error, time.perf_counter() - began) from error
        self.delivered += acknowledged
        return outcomes, rows[len(outcomes) :]

    async def _deliver_careful(self, rows: list) -> list[Outcome]:
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
            async with uow:
                conn = await uow.transaction()
                done: list[int] = []
                for i, row in enumerate(rows):
                    outcome, appended = await self._deliver(uow, conn, row)
                    outcomes.append(outcome)
                    if outcome.error is None:
                        done.append(row["id"])
                    if appended or i == len(rows) - 1:
                        acknowledged = await self._acknowledge(conn, done, rows[0]["subscriber"], [])
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

    async def _acknowledge(
        self, conn: asyncpg.Connection, ids: list[int], subscriber: str, applied: list
    ) -> int:
        """Mark delivered, in the deliveries' own transaction: effects and acknowledgement commit
        together, so a crash cannot leave an applied row unacknowledged (the inbox still guards
        the race of a relay whose lease lapsed mid-batch). `applied`: the message ids whose inbox
        rows go in the same statement (the fast path's; the careful path wrote its own)."""
        if not ids:
            return 0
        return _rowcount(await conn.execute(ACK_WITH_INBOX_SQL, ids, self.instance_id, subscriber, applied))

    async def _deliver(self, uow: UnitOfWork, conn: asyncpg.Connection, row) -> tuple[Outcome, bool]:
        """One delivery in a savepoint. Returns its outcome and whether it appended events."""
        started = time.perf_counter()
        bound = self.system.subscriptions.get(row["subscriber"])
        child = uow.child()
        try:
            async with asyncio.timeout(self.handler_timeout):
                for conflict in range(5):
                    try:
                        async with conn.transaction():  # SAVEPOINT: a failure undoes this delivery only
                            if not await conn.fetchval(INBOX_SQL, row["subscriber"], row["message_id"]):
                                break  # applied before (a redelivery): acknowledge without running it
                            await self._apply(bound, child, row)
                        break
                    except ConcurrencyError:
                        child = uow.child()  # decide again on fresh state
                        if conflict == 4:
                            raise
            return Outcome(row, None, time.perf_counter() - started), bool(child.positions)
        except Exception as error:
            return Outcome(row, error, time.perf_counter() - started), False

    async def _apply(self, bound, uow: UnitOfWork, row) -> None:
        if bound is None or bound.handler is None:
            raise PermanentError(f"no subscription named {row['subscriber']!r} is hosted here")
        max_attempts = bound.subscription.max_attempts or self.system.settings.retry_max_attempts
        if row["attempts"] > max_attempts:
            raise LeaseExpired(f"gave up: {row['attempts'] - 1} attempts ended without an outcome")
        event = self.system.catalog.decode(row["type"], row["payload"])
        headers = _decode_headers(row["headers"])
        context.correlation_id.set(headers.get("correlation_id"))
        context.causation_id.set(str(row["message_id"]))
        envelope = Envelope(
            message_id=row["message_id"],
            position=row["position"],
            subscriber=row["subscriber"],
            attempt=row["attempts"],
            headers=headers,
        )
        await bound.handler(event, uow=uow, envelope=envelope)

    async def _settle(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            if o.error is None:
                DELIVERED.labels(o.row["subscriber"]).inc()
                LAG.observe(float(o.row["age"]) + o.seconds)
        retries: tuple[list, list, list] = ([], [], [])
        for outcome in outcomes:
            if outcome.error is None:
                continue
            row, error = outcome.row, outcome.error
            bound = self.system.subscriptions.get(row["subscriber"])
            sub = bound.subscription if bound else None
            settings = self.system.settings
            max_attempts = (sub and sub.max_attempts) or settings.retry_max_attempts
            summary = f"{type(error).__name__}: {error}"[:2000]
            if isinstance(error, (PermanentError, LeaseExpired)) or row["attempts"] >= max_attempts:
                FAILED.labels(row["subscriber"], "dead_lettered").inc()
                await self._dead_letter(row, error, summary)
            else:
                FAILED.labels(row["subscriber"], "retry").inc()
                delay = backoff_delay(
                    row["attempts"],
                    (sub and sub.retry_base_seconds) or settings.retry_base_seconds,
                    (sub and sub.retry_cap_seconds) or settings.retry_cap_seconds,
                )
                retries[0].append(row["id"])
                retries[1].append(delay)
                retries[2].append(summary)
                log.info("retrying %s for %s in %.2fs: %s", row["id"], row["subscriber"], delay, summary)
        if retries[0]:
            await self.db.execute(RETRY_SQL, *retries, self.instance_id)

    async def _dead_letter(self, row, error: BaseException, summary: str) -> None:
        trace = "".join(traceback.format_exception(error, limit=6))[-4000:]
        async with self.db.acquire() as conn:
            letter = await conn.fetchval(
                DEAD_LETTER_SQL,
                row["id"],
                summary,
                type(error).__name__,
                str(error)[:2000],
                trace,
                f"relay:{self.instance_id}",
                self.instance_id,
            )
        if letter is None:
            log.warning(
                "outbox row %s (%s) failed after this relay lost its lease: %s",
                row["id"],
                row["subscriber"],
                summary,
            )
            return
        log.warning(
            "dead-lettered outbox row %s (%s) as %s: %s", row["id"], row["subscriber"], letter, summary
        )


_decode_headers = msgspec.json.Decoder(dict[str, Any]).decode


def _rowcount(status: str) -> int:
    """Rows a statement touched, from asyncpg's command tag ("UPDATE 3", "DELETE 0")."""
    return int(status.rsplit(" ", 1)[1])


GROUP_SIZE = 50
# Claimed batches being delivered at once by one relay (connections stay bounded by `concurrency`).
# 16, not 4: a few batches waiting out a slow WAL flush must not stop the next from starting its
# handlers (commit->handler lag p99 at 1,000 events/s, two runs each: 71 and 58 ms with 4, 49
# and 43 ms with 16).
BATCHES_IN_FLIGHT = 16


def _groups(rows: list) -> list[list]:
    """Split a batch into delivery groups (one connection each, delivered in turn), one
    subscriber's rows together: a failing subscriber's fast run rolls back and re-runs only its
    own deliveries, never another subscriber's."""
    by_subscriber: dict[str, list] = {}
    for row in rows:
        by_subscriber.setdefault(row["subscriber"], []).append(row)
    return [
        rows[i : i + GROUP_SIZE] for rows in by_subscriber.values() for i in range(0, len(rows), GROUP_SIZE)
    ]
