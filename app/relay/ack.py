"""The acknowledgement: a delivery's rows marked delivered (with the fast path's inbox rows) in
the delivery's own transaction, which commits only if every row was still this relay's."""

from __future__ import annotations

import asyncpg

from app.relay.claims import rowcount

# The acknowledgement also makes its transaction commit without waiting for the WAL flush
# (`synchronous_commit off` for this transaction only: a one-time filter, evaluated once before
# any row). A delivery's transaction only derives state from an outbox row that is already
# durable, and holds the effects, the inbox rows, the new events and the ack together; a crash
# of PostgreSQL can lose the last ones committed (up to 3 x wal_writer_delay), whole -- never
# part of one -- and their rows are then simply pending again and delivered again. Anything that
# depended on a lost delivery is lost with it: the WAL is flushed in order, so a later flushed
# commit flushes every earlier one. Without this, the database sessions spent most of
# their time queued on the WAL flush.
ACK_WITH_INBOX_SQL = """
WITH seen AS (
    INSERT INTO inbox (subscriber, message_id) SELECT $3, unnest($4::uuid[])
)
UPDATE outbox SET status = 'delivered', delivered_at = now(), locked_by = NULL, locked_until = NULL
WHERE id = ANY($1::bigint[]) AND locked_by = $2 AND status = 'pending'
  AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'
"""


async def acknowledge(
    conn: asyncpg.Connection, ids: list[int], instance_id: str, subscriber: str, applied: list
) -> int:
    """Mark delivered, in the deliveries' own transaction: effects and acknowledgement commit
    together, so a crash cannot leave an applied row unacknowledged (the inbox still guards
    the race of a relay whose lease lapsed mid-batch). `applied`: the message ids whose inbox
    rows go in the same statement (the fast path's; the careful path wrote its own)."""
    if not ids:
        return 0
    return rowcount(await conn.execute(ACK_WITH_INBOX_SQL, ids, instance_id, subscriber, applied))


class LeaseLost(Exception):
    """The acknowledgement found rows of this transaction no longer leased to this relay: another
    relay took them over after the lease lapsed (this one stalled). The transaction rolls back, so
    no effect commits without its acknowledgement: the inbox need not be the only guard, and its
    retention cannot open a window for a double apply."""


def held_all(acknowledged: int, ids: list[int]) -> None:
    """Raise LeaseLost unless every row in `ids` was acknowledged (still leased to this relay)."""
    if acknowledged < len(ids):
        raise LeaseLost(f"{len(ids) - acknowledged} of {len(ids)} rows are no longer leased to this relay")
