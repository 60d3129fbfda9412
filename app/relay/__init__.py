"""The relay: claims due outbox rows and delivers them to their subscribers, acknowledging in the
same transaction -- a run of one subscriber's deliveries per transaction (fast path), or a
savepoint per delivery after a handler failure (careful path) -- retries with backoff, or
dead-letters.

Guarantees (docs/ARCHITECTURE.md has the why):
- a row is claimed by one live relay at a time (FOR UPDATE SKIP LOCKED + a lease);
- only the relay that still holds a row's lease acknowledges, retries or dead-letters it;
- per (subscriber, partition key) rows are delivered in id order, one at a time, also across
  retries and dead letters (a row is claimable only when no earlier row of its key is undelivered);
- a delivery's effects commit only with its row's acknowledgement, so at most once (ack.py);
- every failure ends in a retry (available_at, attempts, last_error) or in dead_letters.

Its parts: claims.py (claims and leases), delivery.py and fast.py (the careful and fast paths),
ack.py (the acknowledgement), policy.py (one retry policy per subscription), settle.py (retry or
dead-letter), dead_letters.py (the dead-letter state machine), purge.py, yield_gate.py. The
Relay class here keeps the lifecycle: start, poll and wake, stop, drain, run_once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import asyncpg

from app.db import OUTBOX_CHANNEL
from app.relay import purge
from app.relay.ack import acknowledge
from app.relay.claims import Batch, Claims, until_idle
from app.relay.delivery import Delivery, groups
from app.relay.policy import RetryPolicies, backoff_delay
from app.relay.settle import settle
from app.relay.yield_gate import YieldGate

if TYPE_CHECKING:
    from app.bootstrap import System

__all__ = ["Relay", "backoff_delay"]

log = logging.getLogger(__name__)

RUN_HOLD_SECONDS = 0.005  # a run whose handlers recorded events appends them once it has run this long
PURGE_BATCH = 5000
PURGE_ROUNDS = 20
# Claimed batches being delivered at once by one relay (connections stay bounded by `concurrency`).
# 16, not 4: a few batches waiting out a slow WAL flush must not stop the next from starting its
# handlers (the commit-to-handler lag's p99 is lower with 16).
BATCHES_IN_FLIGHT = 16


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
        self.retention_seconds = settings.outbox_retention_seconds
        self.inbox_retention_seconds = settings.inbox_retention_seconds
        self.linger_seconds = settings.relay_linger_seconds
        self.concurrency = concurrency or max(2, system.db.max_size // 2)
        self._limit = asyncio.Semaphore(self.concurrency)
        self._claims = Claims(
            self.db, self.instance_id, self.subscribers, self.batch_size, self.lease_seconds
        )
        self._policies = RetryPolicies(system.subscriptions, settings)
        self._delivery = Delivery(
            system, self.instance_id, settings.relay_handler_timeout, self._policies, self._acknowledge
        )
        self._gate = YieldGate(system, settings.relay_yield_seconds)
        self._wake = asyncio.Event()
        self._unsubscribe = system.db.on_outbox_written(self._wake.set)  # commits in this process
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._listener: asyncpg.Connection | None = None

    @property
    def delivered(self) -> int:
        """Rows this relay acknowledged."""
        return self._delivery.delivered

    @property
    def _careful_until(self) -> dict[str, float]:
        return self._delivery.careful_until

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
        re-checks every row the winner took, so claims get much slower and the relay delivers
        less. Per-key order holds across batches: a row in flight holds back its key's later
        rows."""
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
        return await purge.purge_delivered(self.db, self.retention_seconds, PURGE_BATCH, rounds)

    async def purge_inbox(self, rounds: int = PURGE_ROUNDS) -> int:
        """Delete inbox rows older than their retention period whose message has no undelivered
        outbox row left (app/relay/purge.py says why that is safe), PURGE_BATCH at a time."""
        held = self.system.inbox_holds()  # subscribers whose messages a broker may still redeliver
        return await purge.purge_inbox(self.db, self.inbox_retention_seconds, PURGE_BATCH, rounds, held)

    async def _purge_forever(self) -> None:
        """Once a second: up to PURGE_ROUNDS x PURGE_BATCH rows a second of each table, far above
        what the relay delivers, so neither grows past its retention period."""
        while True:
            await asyncio.sleep(1.0)
            for what, purge_once in (("delivered rows", self.purge_delivered), ("inbox rows", self.purge_inbox)):
                try:
                    await purge_once()
                except Exception as error:  # keep purging: a purge that died would let a table grow
                    log.warning("relay %s: could not purge %s: %s", self.instance_id, what, error)

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
        return await until_idle(self.run_once, timeout)

    # -- one cycle -------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim one batch, deliver it, settle every row. Returns how many rows were claimed."""
        batch = await self._claim()
        if batch is None:
            return 0
        await self._deliver_batch(batch)
        return len(batch.rows)

    def _acknowledge(self, conn: asyncpg.Connection, ids: list[int]) -> Awaitable[int]:
        """Both paths acknowledge through here (`delivery.acknowledge` with this relay's id): the
        seam where a test stops a relay between its handlers and its commit."""
        return acknowledge(conn, ids, self.instance_id, delete=self.retention_seconds <= 0)

    async def _claim(self) -> Batch | None:
        return await self._claims.claim()

    async def _deliver_batch(self, batch: Batch) -> None:
        """Deliver a batch, each subscriber's rows on a connection of their own, and settle them.
        If this is interrupted, every row not settled goes back without spending its attempt."""
        try:
            hold = RUN_HOLD_SECONDS  # read here, so tests can shorten or stretch it

            async def bounded(group):
                async with self._limit, self._gate.turn(batch, group[0]):
                    return await self._delivery.group(group, hold)

            outcomes = await asyncio.gather(*map(bounded, groups(batch.rows)))
            await settle(self.system, [o for group in outcomes for o in group], self._policies, self.instance_id)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._claims.release(batch))
            raise
        finally:
            batch.keeper.cancel()
