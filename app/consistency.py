"""Read-your-writes: wait (bounded) until a subscriber has applied the event at a position."""

from __future__ import annotations

import asyncio
import time

from app.db import Database

# Applied = no undelivered outbox row for it is left: it was never addressed to this subscriber,
# or it was delivered -- and a delivery's effects commit with its acknowledgement
# (app/relay/ack.py), so delivered means applied. Not "checkpoint >= position": with per-key
# parallel delivery a later event can be applied first.
APPLIED_SQL = """
SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE subscriber = $1 AND message_id = e.event_id
                   AND status <> 'delivered')
FROM events e WHERE e.position = $2
"""


async def is_applied(db: Database, subscriber: str, position: int) -> bool:
    applied = await db.fetchval(APPLIED_SQL, subscriber, position)
    return applied is not False  # None: no such position; nothing to wait for


async def wait_until_applied(db: Database, subscriber: str, position: int, timeout: float = 2.0) -> bool:
    """True once applied; False when `timeout` passed first (the caller answers with what it has)."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not await is_applied(db, subscriber, position):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(delay)  # polling the database: the applying relay may be another replica
        delay = min(delay * 2, 0.05)
    return True
