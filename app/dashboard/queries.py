"""What the dashboard reads. The live panel runs every two seconds per open page, so it reads only
undelivered outbox rows (the partial indexes on them), delivered rows of the last minute (the
index on delivered_at) and parked dead letters; never the delivered rows kept for inspection.
With no outbox retention (the default) a row is deleted when it is delivered, so there is no
delivered row to count or show: the panel says where the delivery rate is instead. The correlation search adds no index to `events` (one would cost every append):
it scans a bounded window of the newest events by primary key instead."""

from __future__ import annotations

import re
from typing import Any

from app.db import Database
from app.registry import STALE_AFTER_BEATS, list_services
from app.relay import dead_letters as dlq

SEARCH_WINDOW = 100_000  # newest events (and their outbox rows) a correlation search looks through
CORRELATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # what the HTTP edge accepts as X-Request-ID

# Undelivered rows per subscriber; with delivered rows kept, their count of the last minute joins.
WAITING_SQL = """
SELECT subscriber,
       count(*) FILTER (WHERE status = 'pending' AND (locked_until IS NULL OR locked_until <= now())) AS pending,
       count(*) FILTER (WHERE status = 'pending' AND locked_until > now()) AS inflight,
       count(*) FILTER (WHERE status = 'blocked') AS blocked,
       count(*) FILTER (WHERE status = 'dead') AS dead,
       extract(epoch FROM now() - min(created_at))::float8 AS oldest_age_seconds,
       extract(epoch FROM now() - min(available_at)
               FILTER (WHERE status = 'pending' AND available_at <= now()))::float8 AS lag_seconds
FROM outbox WHERE status <> 'delivered' GROUP BY subscriber
"""

SUBSCRIBERS_SQL = f"""
WITH waiting AS (
{WAITING_SQL}), delivered AS (
    SELECT subscriber, count(*) AS per_minute FROM outbox
    WHERE status = 'delivered' AND delivered_at > now() - interval '1 minute' GROUP BY subscriber
)
SELECT subscriber, coalesce(pending, 0) AS pending, coalesce(inflight, 0) AS inflight,
       coalesce(blocked, 0) AS blocked, coalesce(dead, 0) AS dead, oldest_age_seconds, lag_seconds,
       coalesce(per_minute, 0) AS per_minute
FROM waiting FULL JOIN delivered USING (subscriber)
"""

# A key is parked while a dead row heads it; the rows behind it wait (relay/dead_letters.py parks them).
PARKED_SQL = """
SELECT l.subscriber, l.partition_key, l.id AS dead_letter_id,
       (SELECT count(*) FROM outbox w WHERE w.subscriber = l.subscriber AND w.partition_key = l.partition_key
            AND w.status = 'blocked' AND w.blocked_by = l.id) AS waiting
FROM dead_letters l WHERE l.status = 'parked' ORDER BY l.subscriber, l.partition_key, l.id
"""

EVENTS_SQL = """
SELECT position, event_id, stream_id, version, type, data::text AS data, created_at FROM events
WHERE position > (SELECT coalesce(max(position), 0) FROM events) - $2
  AND metadata->>'correlation_id' = $1
ORDER BY position LIMIT 500
"""

# The window by primary key for delivered rows; undelivered ones (the backlog, on its partial
# indexes) wherever they are, since a dead or blocked row may be older than the window.
DELIVERIES_SQL = """
SELECT id, message_id, position, subscriber, type, status, attempts, delivered_at, last_error,
       coalesce(locked_until > now(), false) AS inflight
FROM outbox WHERE id > (SELECT coalesce(max(id), 0) FROM outbox) - $2 AND message_id = ANY($1::uuid[])
UNION
SELECT id, message_id, position, subscriber, type, status, attempts, delivered_at, last_error,
       coalesce(locked_until > now(), false) AS inflight
FROM outbox WHERE status <> 'delivered' AND message_id = ANY($1::uuid[])
ORDER BY position, subscriber
"""

LETTERS_OF_SQL = """
SELECT id, message_id, position, subscriber, type, status, attempts, error_type, error_message,
       created_at, resolved_by
FROM dead_letters WHERE message_id = ANY($1::uuid[]) ORDER BY position, id
"""


async def overview(db: Database, system) -> dict[str, Any]:
    """Everything the live panel shows, read in one go."""
    settings = system.settings
    kept = settings.outbox_retention_seconds > 0
    rows = {r["subscriber"]: dict(r) for r in await db.fetch(SUBSCRIBERS_SQL if kept else WAITING_SQL)}
    empty = {"pending": 0, "inflight": 0, "blocked": 0, "dead": 0, "oldest_age_seconds": None,
             "lag_seconds": None, "per_minute": 0 if kept else None}
    for row in rows.values():
        row.setdefault("per_minute", None)  # None: not counted, the rows are gone
    for name in system.subscriptions:  # idle subscribers are listed too, with zeros
        rows.setdefault(name, {"subscriber": name, **empty})
    return {
        "instance": settings.instance_id,
        "delivered_kept": kept,
        "services": await list_services(db, settings.heartbeat_seconds * STALE_AFTER_BEATS, include_stale=True),
        "subscribers": [rows[name] for name in sorted(rows)],
        "breakers": breakers(system.mediator),
        "parked_keys": [dict(r) for r in await db.fetch(PARKED_SQL)],
        "dead_letters": await dlq.list_dead_letters(db, status="parked", limit=50),
        "dead_letters_parked": await db.fetchval("SELECT count(*) FROM dead_letters WHERE status = 'parked'"),
    }


def breakers(mediator) -> list[dict[str, Any]]:
    """This process's circuit breakers: each process has its own, so another replica's may differ."""
    found = []
    for module, breaker in sorted(mediator.breakers.items()):
        found.append({
            "module": module,
            "state": breaker.current_state.name.lower().replace("_", "-"),
            "failures": breaker.fail_counter,
            "fail_max": breaker.fail_max,
        })
    return found


async def correlation(db: Database, system, correlation_id: str) -> dict[str, Any]:
    """One business transaction: its events in order, their deliveries and dead letters."""
    events = [dict(r) for r in await db.fetch(EVENTS_SQL, correlation_id, SEARCH_WINDOW)]
    ids = [e["event_id"] for e in events]
    fanout = max((len(s) for s in system.catalog.subscribers.values()), default=1) or 1
    deliveries = [dict(r) for r in await db.fetch(DELIVERIES_SQL, ids, SEARCH_WINDOW * fanout)] if ids else []
    letters = [dict(r) for r in await db.fetch(LETTERS_OF_SQL, ids)] if ids else []
    return {"events": events, "deliveries": deliveries, "dead_letters": letters, "window": SEARCH_WINDOW,
            "delivered_kept": system.settings.outbox_retention_seconds > 0}
