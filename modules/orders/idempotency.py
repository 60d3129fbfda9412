"""Idempotency-Key for PlaceOrder: the first request with a key decides; a retry with the same key
(on any replica) gets the same answer and creates nothing; the key with another request is a 422.
A key is honoured for SWITCHBOARD_IDEMPOTENCY_RETENTION after its first use, then forgotten."""

from __future__ import annotations

import hashlib
from datetime import datetime
from uuid import UUID

import msgspec

from app.db import Database
from app.messages import CommandRejected
from app.periodic import every
from app.settings import Settings
from modules.orders.commands import (
    EarlierRejection,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    OrderAccepted,
    PlaceOrder,
)

STALE_SECONDS = 60  # a claim this old with no outcome was left by a dead process: take it over

CLAIM_SQL = """
INSERT INTO orders_idempotency (key, fingerprint, order_id) VALUES ($1, $2, $3)
ON CONFLICT (key) DO UPDATE SET order_id = excluded.order_id, claimed_at = now()
    WHERE orders_idempotency.fingerprint = excluded.fingerprint
      AND orders_idempotency.rejection IS NULL
      AND orders_idempotency.claimed_at < now() - make_interval(secs => $4)
      AND NOT EXISTS (SELECT 1 FROM events WHERE stream_id = 'order-' || orders_idempotency.order_id)
RETURNING order_id
"""

EARLIER_SQL = """
SELECT k.fingerprint, k.rejection, e.position, e.data->>'placed_at' AS placed_at, k.order_id
FROM orders_idempotency k
LEFT JOIN events e ON e.stream_id = 'order-' || k.order_id AND e.version = 1
WHERE k.key = $1
"""

# Every replica runs the sweep: each skips the rows another is deleting. Batches keep each
# statement short next to the requests writing keys.
FORGET_SQL = """
DELETE FROM orders_idempotency WHERE ctid = ANY(ARRAY(  -- by row address: key IN (...) scanned the table
    SELECT ctid FROM orders_idempotency WHERE claimed_at < now() - make_interval(secs => $1)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
))
"""
FORGET_BATCH = 1000
FORGET_ROUNDS = 50

_encode = msgspec.json.Encoder().encode


def fingerprint(cmd: PlaceOrder) -> str:
    request = (cmd.customer_id, [(line.sku, line.quantity) for line in cmd.lines], cmd.payment_method)
    return hashlib.sha256(_encode(request)).hexdigest()


async def claim(db: Database, cmd: PlaceOrder, order_id: UUID) -> OrderAccepted | None:
    """None: this request owns the key, go on. Otherwise the earlier outcome (or its error raised)."""
    assert cmd.idempotency_key is not None
    if await db.fetchval(CLAIM_SQL, cmd.idempotency_key, fingerprint(cmd), order_id, STALE_SECONDS):
        return None
    earlier = await db.fetchrow(EARLIER_SQL, cmd.idempotency_key)
    if earlier is None:  # the key vanished between the two statements: treat as in progress
        raise IdempotencyKeyInUse("retry shortly")
    if earlier["fingerprint"] != fingerprint(cmd):
        raise IdempotencyKeyReused(f"key {cmd.idempotency_key!r} was first used with a different request")
    if earlier["rejection"] is not None:
        rejection = msgspec.json.decode(earlier["rejection"])
        raise EarlierRejection(rejection["detail"], rejection["status"], rejection["title"])
    if earlier["position"] is None:
        raise IdempotencyKeyInUse(f"the first request with key {cmd.idempotency_key!r} is still being processed")
    return OrderAccepted(
        order_id=earlier["order_id"],
        position=earlier["position"],
        placed_at=datetime.fromisoformat(earlier["placed_at"]),
    )


async def remember_rejection(db: Database, key: str, error: CommandRejected) -> None:
    await db.execute(
        "UPDATE orders_idempotency SET rejection = $2 WHERE key = $1",
        key,
        _encode({"status": error.status_code, "title": error.title, "detail": error.detail}).decode(),
    )


async def release(db: Database, key: str, order_id: UUID) -> None:
    """The first request failed without an answer to keep (e.g. 503): let a retry start afresh."""
    await db.execute(
        "DELETE FROM orders_idempotency WHERE key = $1 AND order_id = $2"
        # a deadline may cancel us after the order's COMMIT went through: then the key stays
        " AND NOT EXISTS (SELECT 1 FROM events WHERE stream_id = 'order-' || $2::text)",
        key,
        order_id,
    )


async def forget_expired(db: Database, retention_seconds: float, rounds: int = FORGET_ROUNDS) -> int:
    """Delete the keys first used more than `retention_seconds` ago, FORGET_BATCH at a time, until
    none are left or `rounds` batches went. Returns how many went."""
    forgotten = 0
    for _ in range(rounds):
        deleted = int((await db.execute(FORGET_SQL, retention_seconds, FORGET_BATCH)).rsplit(" ", 1)[1])
        forgotten += deleted
        if deleted < FORGET_BATCH:
            break
    return forgotten


async def forget_expired_keys(db: Database, settings: Settings) -> None:
    """Orders' background task: the usual Idempotency-Key contract (a key is honoured for a
    retention period, Stripe's is 24 h) keeps orders_idempotency from growing with every keyed
    order ever placed. A round every tenth of the retention (at most a minute apart), so a key
    outlives its period by at most that and the table's size holds steady between rounds."""
    retention = settings.idempotency_retention_seconds
    await every(min(max(retention / 10, 0.05), 60), lambda: forget_expired(db, retention), "idempotency key sweep")
