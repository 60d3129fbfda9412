"""Dead letters, the whole state machine: the relay parks a row that failed for good (and its
key's later rows behind it); an operator lists, reads, replays or discards it (the CLI's `dlq`
commands and the admin API call these functions); and the outbox status shows the keys parked.
Every statement is parameterised: nothing is built from input."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from app.db import OUTBOX_CHANNEL, Database

log = logging.getLogger("app.relay")

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

# 'inflight' is a pending row under a live lease (a relay is delivering it); the table keeps such
# rows 'pending' so that claiming one changes no indexed column (see app/relay/claims.py CLAIM_SQL).
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


async def park(db: Database, row, error: BaseException, summary: str, instance_id: str) -> int | None:
    """Dead-letter a row this relay still holds (and park its key's later rows). Returns the
    letter's id, or None if the relay lost the row's lease (another relay's outcome stands)."""
    trace = "".join(traceback.format_exception(error, limit=6))[-4000:]
    async with db.acquire() as conn:
        letter = await conn.fetchval(
            DEAD_LETTER_SQL,
            row["id"],
            summary,
            type(error).__name__,
            str(error)[:2000],
            trace,
            f"relay:{instance_id}",
            instance_id,
        )
    if letter is None:
        log.warning(
            "outbox row %s (%s) failed after this relay lost its lease: %s",
            row["id"],
            row["subscriber"],
            summary,
        )
        return None
    log.warning("dead-lettered outbox row %s (%s) as %s: %s", row["id"], row["subscriber"], letter, summary)
    return letter


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
