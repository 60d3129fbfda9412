"""Claiming due outbox rows under a lease, keeping the lease while they are delivered, and
handing unsettled rows back."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg

from app import observe
from app.db import Database

log = logging.getLogger("app.relay")

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
          o.last_error, extract(epoch FROM now() - o.created_at) AS age
"""

EXTEND_SQL = """
UPDATE outbox SET locked_until = now() + make_interval(secs => $3)
WHERE id = ANY($1::bigint[]) AND locked_by = $2 AND status = 'pending'
"""

# Settling touches only rows this relay still holds: if its lease lapsed and another relay took a
# row over, that relay's outcome stands (a stale retry or dead letter would overwrite it; a stale
# acknowledgement rolls its transaction back, app/relay/ack.py).
# For the claim's transaction only, in one round trip:
# - synchronous_commit off: a claim is a lease marker; if a crash loses it, its rows are simply
#   claimable again (nothing of theirs was acknowledged, so nothing applied), and the acknowledgement's durable commit
#   flushes it anyway. So its COMMIT does not wait for the WAL flush, which the handlers (and
#   the commit-to-handler lag) would otherwise wait on.
# - no bitmap scans, no sorts: the claim must walk outbox_due in id order and stop at LIMIT. A
#   queue table's statistics are always stale; with a freshly filled outbox the planner, thinking
#   one row matches, bitmap-scanned every pending row, checked each one's key and sorted them,
#   many times slower than the walk in id order.
CLAIM_SETTINGS = """
SELECT set_config('synchronous_commit', 'off', true), set_config('enable_bitmapscan', 'off', true),
       set_config('enable_sort', 'off', true)
"""

# Handing rows back (graceful stop, or the batch was cancelled): the attempt never reached an
# outcome and its transaction rolled back, so it does not count against max_attempts.
RELEASE_SQL = """
UPDATE outbox SET locked_by = NULL, locked_until = NULL, attempts = greatest(attempts - 1, 0)
WHERE id = ANY($1::bigint[]) AND locked_by = $2 AND status = 'pending'
"""


@dataclass
class Batch:
    rows: list
    ids: list[int]
    keeper: asyncio.Task  # extends the rows' leases until they are settled
    claimed_at: float = 0.0  # time.monotonic() at the claim

    def age(self, row) -> float:
        """Seconds since the row was committed: its age at the claim, plus the time since."""
        return float(row["age"]) + time.monotonic() - self.claimed_at


class Claims:
    """One relay's claims: which subscribers, how many rows at a time, for how long."""

    def __init__(
        self, db: Database, instance_id: str, subscribers: list[str], batch_size: int, lease_seconds: float
    ) -> None:
        self.db, self.instance_id, self.subscribers = db, instance_id, subscribers
        self.batch_size, self.lease_seconds = batch_size, lease_seconds

    async def claim(self) -> Batch | None:
        """Claim due rows; their leases are kept from now until the batch is settled."""
        if not self.subscribers:
            return None
        began = time.time_ns()
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute(CLAIM_SETTINGS)
            rows = await conn.fetch(
                CLAIM_SQL, self.subscribers, self.batch_size, self.instance_id, self.lease_seconds
            )
        if not rows:
            return None  # no span: an idle relay polling would fill the traces with empty claims
        if observe.TRACING:
            observe.claimed(rows, began, self.instance_id)
        ids = [r["id"] for r in rows]
        return Batch(rows, ids, asyncio.create_task(self._keep_leases(ids)), time.monotonic())

    async def release(self, batch: Batch) -> None:
        """Hand the batch's unsettled rows back without spending their attempt."""
        await self.db.execute(RELEASE_SQL, batch.ids, self.instance_id)

    async def _keep_leases(self, ids: list[int]) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.db.execute(EXTEND_SQL, ids, self.instance_id, self.lease_seconds)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                # keep trying: a keeper that died here would let the lease lapse mid-batch
                log.warning("relay %s: could not extend leases: %s", self.instance_id, error)


async def until_idle(run_once, timeout: float) -> int:
    """Claim-and-settle cycles until one claims nothing (rows waiting for a later retry stay);
    how many rows they claimed. What `drain()` of the relay and of the publisher is, for tests and tools."""
    claimed = 0
    async with asyncio.timeout(timeout):
        while count := await run_once():
            claimed += count
    return claimed


def rowcount(status: str) -> int:
    """Rows a statement touched, from asyncpg's command tag ("UPDATE 3", "DELETE 0")."""
    return int(status.rsplit(" ", 1)[1])
