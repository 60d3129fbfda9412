"""What operators do to the outbox and dead letters; shared by the CLI and the admin API.
Every statement is parameterised: nothing is built from input."""

from __future__ import annotations

from typing import Any

from app.db import OUTBOX_CHANNEL, Database

# 'inflight' is a pending row under a live lease (a relay is delivering it); the table keeps such
# rows 'pending' so that claiming one changes no indexed column (see app/relay.py CLAIM_SQL).
STATUS_SQL = """
WITH o AS (
    SELECT subscriber, attempts, created_at, available_at,
           CASE WHEN status = 'pending' AND locked_until > now() THEN 'inflight' ELSE status END AS status
    FROM outbox
)
SELECT subscriber, status, count(*) AS rows, max(attempts) AS max_attempts,
       extract(epoch FROM now() - min(created_at))::float8 AS oldest_age_seconds,
       extract(epoch FROM now() - min(available_at)
               FILTER (WHERE status = 'pending' AND available_at <= now()))::float8 AS oldest_due_seconds
FROM o GROUP BY subscriber, status ORDER BY subscriber, status
"""

# A key is parked while a dead row heads it; rows arriving later wait behind it too.
PARKED_SQL = """
SELECT d.subscriber, d.partition_key, l.id AS dead_letter_id,
       (SELECT count(*) FROM outbox w WHERE w.subscriber = d.subscriber
            AND w.partition_key = d.partition_key AND w.id > d.id AND w.status <> 'delivered') AS waiting
FROM outbox d JOIN dead_letters l ON l.outbox_id = d.id AND l.status = 'parked'
WHERE d.status = 'dead' ORDER BY d.subscriber, d.partition_key
"""

LETTER_COLUMNS = """id, outbox_id, message_id, position, subscriber, type, partition_key, attempts, error_type,
    error_message, first_failed_at, last_failed_at, status, resolved_at, resolved_by, created_at"""

REPLAY_SQL = """
WITH letter AS (
    UPDATE dead_letters SET status = 'replayed', resolved_at = now(), resolved_by = $2
    WHERE id = ANY($1::bigint[]) AND status = 'parked'
    RETURNING id, outbox_id
), again AS (
    UPDATE outbox o SET status = 'pending', attempts = 0, available_at = now(), locked_by = NULL,
        locked_until = NULL, first_failed_at = NULL
    FROM letter WHERE o.id = letter.outbox_id
), released AS (
    UPDATE outbox o SET status = 'pending', blocked_by = NULL FROM letter WHERE o.blocked_by = letter.id
), history AS (
    INSERT INTO dead_letter_history (dead_letter_id, action, actor) SELECT id, 'replayed', $2 FROM letter
)
SELECT id FROM letter ORDER BY id
"""

DISCARD_SQL = """
WITH letter AS (
    UPDATE dead_letters SET status = 'discarded', resolved_at = now(), resolved_by = $2
    WHERE id = ANY($1::bigint[]) AND status = 'parked'
    RETURNING id, outbox_id
), gone AS (
    DELETE FROM outbox o USING letter WHERE o.id = letter.outbox_id
), released AS (
    UPDATE outbox o SET status = 'pending', blocked_by = NULL FROM letter WHERE o.blocked_by = letter.id
), history AS (
    INSERT INTO dead_letter_history (dead_letter_id, action, actor) SELECT id, 'discarded', $2 FROM letter
)
SELECT id FROM letter ORDER BY id
"""


async def outbox_status(db: Database) -> dict[str, Any]:
    rows = await db.fetch(STATUS_SQL)
    parked = await db.fetch(PARKED_SQL)
    return {
        "by_subscriber": [dict(r) for r in rows],
        "parked_keys": [dict(r) for r in parked],
        "dead_letters_parked": await db.fetchval("SELECT count(*) FROM dead_letters WHERE status = 'parked'"),
    }


async def list_dead_letters(
    db: Database, *, subscriber: str | None = None, status: str | None = "parked", limit: int = 100
) -> list[dict[str, Any]]:
    rows = await db.fetch(
        f"SELECT {LETTER_COLUMNS} FROM dead_letters"
        " WHERE ($1::text IS NULL OR subscriber = $1) AND ($2::text IS NULL OR status = $2)"
        " ORDER BY id LIMIT $3",
        subscriber,
        status,
        limit,
    )
    return [dict(r) for r in rows]


async def get_dead_letter(db: Database, letter_id: int) -> dict[str, Any] | None:
    row = await db.fetchrow("SELECT * FROM dead_letters WHERE id = $1", letter_id)
    if row is None:
        return None
    letter = dict(row)
    letter["history"] = [
        dict(h)
        for h in await db.fetch(
            "SELECT action, actor, at FROM dead_letter_history WHERE dead_letter_id = $1 ORDER BY id", letter_id
        )
    ]
    return letter


async def replay(db: Database, letter_ids: list[int], actor: str) -> list[int]:
    """Send parked letters back to their subscriber (attempts start again); their keys resume in order."""
    return await _resolve(db, REPLAY_SQL, letter_ids, actor)


async def discard(db: Database, letter_ids: list[int], actor: str) -> list[int]:
    """Drop parked letters for good; the rows parked behind them resume."""
    return await _resolve(db, DISCARD_SQL, letter_ids, actor)


async def parked_ids(db: Database, subscriber: str | None = None) -> list[int]:
    rows = await db.fetch(
        "SELECT id FROM dead_letters WHERE status = 'parked' AND ($1::text IS NULL OR subscriber = $1) ORDER BY id",
        subscriber,
    )
    return [r["id"] for r in rows]


async def _resolve(db: Database, sql: str, letter_ids: list[int], actor: str) -> list[int]:
    async with db.acquire() as conn, conn.transaction():
        done = [r["id"] for r in await conn.fetch(sql, letter_ids, actor)]
        if done:
            await conn.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
    return done
