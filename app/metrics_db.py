"""Gauges read from the database: outbox rows by status, the most overdue row, parked dead letters.

A scrape reads them at most every `max_age` seconds: the last reading is kept and a stale one is
refreshed by the scrape that finds it stale (concurrent scrapes share one refresh), never on a
request's or the relay's path. A reading that fails or takes too long leaves the last one in place.
With several workers each sets its reading with a timestamp (`mostrecent`): a scrape shows the
freshest any worker took."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from prometheus_client import Gauge

from app.db import Database

log = logging.getLogger(__name__)

STATUSES = ("pending", "inflight", "blocked", "dead")

OUTBOX_ROWS = Gauge(
    "switchboard_outbox_rows",
    "Undelivered outbox rows by subscriber and status (inflight: pending under a live lease)",
    ("subscriber", "status"),
    multiprocess_mode="mostrecent",
    registry=None,
)
OLDEST_DUE = Gauge(
    "switchboard_outbox_oldest_due_seconds",
    "How long the most overdue deliverable outbox row has been due (0: none is due)",
    ("subscriber",),
    multiprocess_mode="mostrecent",
    registry=None,
)
PARKED = Gauge(
    "switchboard_dead_letters_parked",
    "Dead letters waiting for an operator (replay or discard)",
    ("subscriber",),
    multiprocess_mode="mostrecent",
    registry=None,
)
GAUGES = (OUTBOX_ROWS, OLDEST_DUE, PARKED)

# The same grouping as `switchboard outbox status` (app/relay/dead_letters.py STATUS_SQL), over
# undelivered rows only: the partial index outbox_key_order covers them, and delivered rows kept
# for the retention period are not read.
OUTBOX_SQL = """
WITH o AS (
    SELECT subscriber, available_at,
           CASE WHEN status = 'pending' AND locked_until > now() THEN 'inflight' ELSE status END AS status
    FROM outbox WHERE status <> 'delivered'
)
SELECT subscriber, status, count(*) AS rows,
       extract(epoch FROM now() - min(available_at)
               FILTER (WHERE status = 'pending' AND available_at <= now()))::float8 AS oldest_due_seconds
FROM o GROUP BY subscriber, status
"""

PARKED_SQL = "SELECT subscriber, count(*) AS parked FROM dead_letters WHERE status = 'parked' GROUP BY subscriber"


class DatabaseGauges:
    def __init__(self, max_age: float = 5.0, timeout: float = 2.0) -> None:
        self.max_age = max_age
        self.timeout = timeout
        self.read_at: float | None = None  # monotonic time of the last reading that succeeded
        self.readings = 0
        self._subscribers: set[str] = set()  # every one ever shown: a series that empties reads 0
        self._refresh: asyncio.Task | None = None

    def stale(self) -> bool:
        return self.read_at is None or time.monotonic() - self.read_at >= self.max_age

    async def refresh_if_stale(self, db: Database, subscribers: Iterable[str]) -> None:
        if not self.stale():
            return
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._read(db, list(subscribers)))
        try:  # shielded: a scrape that gives up does not cancel the reading others wait for
            await asyncio.wait_for(asyncio.shield(self._refresh), self.timeout)
        except Exception as error:  # the last reading stays; the scrape still answers
            log.warning("metrics: outbox gauges not refreshed: %s", f"{type(error).__name__}: {error}")

    async def _read(self, db: Database, subscribers: list[str]) -> None:
        async with db.acquire() as conn:
            rows = await conn.fetch(OUTBOX_SQL)
            parked = await conn.fetch(PARKED_SQL)
        self._subscribers.update(subscribers)
        self._subscribers.update(r["subscriber"] for r in rows)
        self._subscribers.update(r["subscriber"] for r in parked)
        counts = {(r["subscriber"], r["status"]): r["rows"] for r in rows}
        due = {r["subscriber"]: r["oldest_due_seconds"] for r in rows if r["oldest_due_seconds"] is not None}
        letters = {r["subscriber"]: r["parked"] for r in parked}
        for subscriber in sorted(self._subscribers):
            for status in STATUSES:
                OUTBOX_ROWS.labels(subscriber, status).set(counts.get((subscriber, status), 0))
            OLDEST_DUE.labels(subscriber).set(max(0.0, due.get(subscriber, 0.0)))
            PARKED.labels(subscriber).set(letters.get(subscriber, 0))
        self.read_at = time.monotonic()
        self.readings += 1
