"""The acknowledgement: a delivery's rows marked delivered in the delivery's own transaction,
which commits only if every row was still this relay's.

Why that makes each effect happen once without an inbox row per delivery: an effect commits only
in the transaction that turns its row from 'pending' to 'delivered' while this relay holds it
(`held_all` rolls the transaction back otherwise), and nothing turns a delivered row back (a
retry, a dead letter and a replay all start from a row that is not delivered). Two deliveries
of one row -- a relay that stalled past its lease, even one that claimed its own row again
under the same instance id -- queue on the row's lock, and the second finds it delivered and
rolls back. A crash loses a delivery's effects with its acknowledgement, whole."""

from __future__ import annotations

import asyncpg

from app.relay.claims import rowcount

# The acknowledgement also makes its transaction commit without waiting for the WAL flush
# (`synchronous_commit off` for this transaction only: a one-time filter, evaluated once before
# any row). A delivery's transaction only derives state from an outbox row that is already
# durable, and holds the effects, the new events and the ack together; a crash
# of PostgreSQL can lose the last ones committed (up to 3 x wal_writer_delay), whole -- never
# part of one -- and their rows are then simply pending again and delivered again. Anything that
# depended on a lost delivery is lost with it: the WAL is flushed in order, so a later flushed
# commit flushes every earlier one. Without this, the database sessions spent most of
# their time queued on the WAL flush.
_HELD = """
WHERE id = ANY($1::bigint[]) AND locked_by = $2 AND status = 'pending'
  AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'
"""
ACK_SQL = "UPDATE outbox SET status = 'delivered', delivered_at = now(), locked_by = NULL, locked_until = NULL" + _HELD
# With no retention (SWITCHBOARD_OUTBOX_RETENTION=0) the row goes at once. The UPDATE's new row
# version is a copy of the whole row (payload included) plus two index entries (the primary key
# and outbox_delivered: `status` is in the partial indexes' predicates, so it is never a HOT
# update), and the purge later deletes it anyway; a DELETE writes neither. Nothing the relay
# needs reads delivered rows: per-key order, read-your-writes and the inbox purge ask only
# whether an undelivered row is left.
DELETE_SQL = "DELETE FROM outbox" + _HELD


async def acknowledge(conn: asyncpg.Connection, ids: list[int], instance_id: str, delete: bool = False) -> int:
    """Mark delivered, in the deliveries' own transaction: effects and acknowledgement commit
    together, so a crash cannot leave an applied row unacknowledged. Returns the rows marked:
    fewer than `ids` means the transaction must roll back (`held_all`). `delete`: the rows are
    deleted instead of kept as 'delivered' (no outbox retention)."""
    if not ids:
        return 0
    return rowcount(await conn.execute(DELETE_SQL if delete else ACK_SQL, ids, instance_id))


class LeaseLost(Exception):
    """The acknowledgement found rows of this transaction no longer leased to this relay: another
    relay took them over after the lease lapsed (this one stalled), or delivered them already. The
    transaction rolls back, so no effect commits without its acknowledgement."""


def held_all(acknowledged: int, ids: list[int]) -> None:
    """Raise LeaseLost unless every row in `ids` was acknowledged (still leased to this relay)."""
    if acknowledged < len(ids):
        raise LeaseLost(f"{len(ids) - acknowledged} of {len(ids)} rows are no longer leased to this relay")
