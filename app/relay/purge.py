"""Deleting delivered outbox rows and old inbox rows once their retention period is over."""

from __future__ import annotations

from collections.abc import Collection

from app.db import Database
from app.relay.claims import rowcount

# Delivered rows stay visible (status 'delivered', delivered_at) for SWITCHBOARD_OUTBOX_RETENTION
# seconds, then go in small batches; claims never look at them (partial indexes).
PURGE_SQL = """
DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox WHERE status = 'delivered' AND delivered_at < now() - make_interval(secs => $1)
    LIMIT $2
    FOR UPDATE SKIP LOCKED  -- every relay purges: never wait on another's batch
)
"""

# Outbox deliveries write no inbox rows (app/relay/delivery.py); the rows here are those of
# relays before the lease-checked acknowledgement and, later, of deliveries from outside the
# database. An inbox row is what stops a redelivery from applying its message twice, and a
# message can be delivered again only from an outbox row that is not 'delivered' yet: pending (a retry, or a
# claim whose relay died), dead (a dead letter, replayable for as long as it is parked) or
# blocked. So a row goes only when no such row of its (subscriber, message) is left -- a lookup in
# the partial unique index outbox_undelivered_message -- and it is older than
# SWITCHBOARD_INBOX_RETENTION: the margin for the one redelivery the database cannot see, a relay
# frozen after its lease lapsed that wakes up still holding the message in memory. A subscriber
# fed from JetStream may also get a message again that JetStream still holds unacknowledged (its
# consumer committed, then died before the ack): those subscribers' rows are held, passed in, for
# as long as their consumers are not known to have been pulling long enough to have had every such
# message back (app/broker/runtime.py).
PURGE_INBOX_SQL = """
DELETE FROM inbox WHERE ctid = ANY(ARRAY(  -- by row address: a key IN (...) made it scan the table
    SELECT i.ctid FROM inbox i
    WHERE i.processed_at < now() - make_interval(secs => $1)
      AND i.subscriber <> ALL($3::text[])  -- held: fed from a broker that may still redeliver
      AND NOT EXISTS (
          SELECT 1 FROM outbox o
          WHERE o.subscriber = i.subscriber AND o.message_id = i.message_id AND o.status <> 'delivered'
          OFFSET 0)  -- a lookup per row: as a join it would read every undelivered row each batch
    LIMIT $2
    FOR UPDATE OF i SKIP LOCKED  -- locked: the address cannot change before the DELETE
))
"""


async def purge_delivered(db: Database, retention_seconds: float, batch: int, rounds: int) -> int:
    """Delete delivered rows older than the retention period, `batch` at a time (short
    statements), until none are left or `rounds` batches went. Returns how many went."""
    return await _in_batches(db, PURGE_SQL, retention_seconds, batch, rounds)


async def purge_inbox(
    db: Database, retention_seconds: float, batch: int, rounds: int, held: Collection[str] = ()
) -> int:
    """Delete inbox rows older than the retention period whose message no outbox row can deliver
    again, except the `held` subscribers' rows, `batch` at a time, until none are left or `rounds`
    batches went. Returns how many went."""
    return await _in_batches(db, PURGE_INBOX_SQL, retention_seconds, batch, rounds, list(held))


async def _in_batches(db: Database, sql: str, retention_seconds: float, batch: int, rounds: int, *more) -> int:
    purged = 0
    for _ in range(rounds):
        deleted = rowcount(await db.execute(sql, retention_seconds, batch, *more))
        purged += deleted
        if deleted < batch:
            break
    return purged
