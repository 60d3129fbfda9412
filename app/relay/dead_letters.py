"""Dead letters, the whole state machine: the relay parks a row that failed for good (and its
key's later rows behind it) and runs its subscription's compensation in the same transaction;
an operator lists, reads, replays or discards it (the CLI's `dlq` commands and the admin API call
these functions, which call the database's switchboard_dlq_* functions, as psql can); and the
outbox status shows the keys parked. Every statement is parameterised: nothing is built from input."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from app import logs
from app.conflicts import retry_on_conflict
from app.db import Database

if TYPE_CHECKING:
    from app.uow import UnitOfWork

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
    error_message, first_failed_at, last_failed_at, status, compensation, resolved_at, resolved_by, created_at"""

# One implementation of replay and discard, in the database (migrations/versions/0006): the CLI,
# the admin API and an operator in psql call the same functions. Each returns the ids it changed.
REPLAY_SQL = "SELECT id FROM switchboard_dlq_replay($1::bigint[], $2::text) AS done(id) ORDER BY id"
DISCARD_SQL = "SELECT id FROM switchboard_dlq_discard($1::bigint[], $2::text) AS done(id) ORDER BY id"

COMPENSATED_SQL = "UPDATE dead_letters SET compensation = $2 WHERE id = $1"
COMPENSATION_CONFLICT_RETRIES = 4  # a compensator that lost a race decides again, in a new savepoint


class Compensation(NamedTuple):
    """A subscription's `on_dead_letter`, bound to one row: run in the transaction that parks it."""

    new_uow: Callable[[], UnitOfWork]
    run: Callable[[UnitOfWork], Awaitable[None]]


async def park(
    db: Database,
    row,
    error: BaseException,
    summary: str,
    instance_id: str,
    compensation: Compensation | None = None,
) -> int | None:
    """Dead-letter a row this relay still holds (and park its key's later rows), and run its
    subscription's compensation in the same transaction. Returns the letter's id, or None if
    the relay lost the row's lease (another relay's outcome stands: nothing is compensated)."""
    trace = "".join(traceback.format_exception(error, limit=6))[-4000:]
    args = (row["id"], summary, type(error).__name__, str(error)[:2000], trace, f"relay:{instance_id}", instance_id)
    if compensation is None:
        async with db.acquire() as conn:
            letter = await conn.fetchval(DEAD_LETTER_SQL, *args)
    else:
        letter = await _park_compensated(compensation, row, args)
    fields = logs.fields_of(row, _json(row["headers"])) | {"error": summary, "dead_letter": letter}
    if letter is None:
        log.warning(
            "outbox row %s (%s) failed after this relay lost its lease: %s",
            row["id"],
            row["subscriber"],
            summary,
            extra={"fields": fields},
        )
        return None
    log.error("dead-lettered outbox row %s (%s) as %s: %s", row["id"], row["subscriber"], letter, summary,
              extra={"fields": fields})  # fmt: skip
    return letter


async def _park_compensated(compensation: Compensation, row, args: tuple) -> int | None:
    """Park, then compensate in a savepoint: the compensator's events commit with the parking,
    or -- if it fails -- the row is parked without them and the letter says why. Either way the
    row ends parked; a failed compensation is logged at error, and a replay runs the row (and,
    should it be dead-lettered again, its compensation) again."""
    uow = compensation.new_uow()
    async with uow:
        conn = await uow.transaction()
        letter = await conn.fetchval(DEAD_LETTER_SQL, *args)
        if letter is not None:

            async def once() -> None:
                child = uow.child()  # a fresh identity map per try: a retry decides on fresh state
                async with conn.transaction():
                    await compensation.run(child)

            try:
                await retry_on_conflict(once, retries=COMPENSATION_CONFLICT_RETRIES)
                outcome = "compensated"
            except Exception as failure:
                outcome = f"compensation failed: {type(failure).__name__}: {failure}"[:2000]
                log.error(
                    "dead letter %s (%s): parked without compensation, %s", letter, row["subscriber"], outcome,
                    exc_info=failure, extra={"fields": logs.fields_of(row, _json(row["headers"]))},
                )  # fmt: skip
            await conn.execute(COMPENSATED_SQL, letter, outcome)
        await uow.commit()
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
    # jsonb arrives as text: decoded, `dlq show` and the admin API print objects, not strings
    letter["payload"] = _json(letter["payload"])
    letter["headers"] = _json(letter["headers"])
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
    return [r["id"] for r in await db.fetch(sql, letter_ids, actor)]


_json = msgspec.json.Decoder().decode
