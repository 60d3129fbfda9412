"""Deleting delivered outbox rows once their retention period is over."""

from __future__ import annotations

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


async def purge_delivered(db: Database, retention_seconds: float, batch: int, rounds: int) -> int:
    """Delete delivered rows older than the retention period, `batch` at a time (short
    statements), until none are left or `rounds` batches went. Returns how many went."""
    purged = 0
    for _ in range(rounds):
        deleted = rowcount(await db.execute(PURGE_SQL, retention_seconds, batch))
        purged += deleted
        if deleted < batch:
            break
    return purged
