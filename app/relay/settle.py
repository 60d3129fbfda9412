"""Settling a batch's outcomes: count the deliveries, schedule the failures' retries (one
statement for the batch) or dead-letter them -- with their subscription's compensation, in the
same transaction -- by each subscriber's retry policy."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram

from app import logs
from app.messages import PermanentError
from app.relay import dead_letters
from app.relay.ack import LeaseLost
from app.relay.claims import RELEASE_SQL
from app.relay.policy import LeaseExpired, RetryPolicies
from app.relay.rows import decode_headers, open_row

if TYPE_CHECKING:
    from app.bootstrap import System

log = logging.getLogger("app.relay")

DELIVERED = Counter("switchboard_relay_delivered_total", "Outbox rows delivered", ["subscriber"])
FAILED = Counter("switchboard_relay_failures_total", "Failed deliveries", ["subscriber", "outcome"])
LAG = Histogram(
    "switchboard_relay_lag_seconds",
    "Commit-to-handler lag of delivered rows",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

RETRY_SQL = """
UPDATE outbox o SET locked_by = NULL, locked_until = NULL,
    available_at = now() + make_interval(secs => f.delay), last_error = f.error,
    first_failed_at = coalesce(o.first_failed_at, now())
FROM unnest($1::bigint[], $2::float8[], $3::text[]) AS f(id, delay, error)
WHERE o.id = f.id AND o.locked_by = $4 AND o.status = 'pending'
"""


@dataclass
class Outcome:
    row: Any
    error: BaseException | None = None
    seconds: float = 0.0


async def settle(system: System, outcomes: list[Outcome], policies: RetryPolicies, instance_id: str) -> None:
    for o in outcomes:
        if o.error is None:
            DELIVERED.labels(o.row["subscriber"]).inc()
            LAG.observe(float(o.row["age"]) + o.seconds)
    retries: tuple[list, list, list] = ([], [], [])
    handed_back: list[int] = []
    for outcome in outcomes:
        if outcome.error is None:
            continue
        row, error = outcome.row, outcome.error
        if isinstance(error, LeaseLost):  # no outcome was reached: not an attempt, not a failure
            handed_back.append(row["id"])
            continue
        policy = policies[row["subscriber"]]
        summary = f"{type(error).__name__}: {error}"[:2000]
        if isinstance(error, (PermanentError, LeaseExpired)) or policy.exhausted(row["attempts"]):
            FAILED.labels(row["subscriber"], "dead_lettered").inc()
            await dead_letters.park(system.db, row, error, summary, instance_id, _compensation(system, row, summary))
        else:
            FAILED.labels(row["subscriber"], "retry").inc()
            delay = policy.delay(row["attempts"])
            retries[0].append(row["id"])
            retries[1].append(delay)
            retries[2].append(summary)
            fields = logs.fields_of(row, decode_headers(row["headers"])) | {"delay": round(delay, 3), "error": summary}
            log.warning("retrying %s for %s in %.2fs: %s", row["id"], row["subscriber"], delay, summary,
                        extra={"fields": fields})  # fmt: skip
    if retries[0]:
        await system.db.execute(RETRY_SQL, *retries, instance_id)
    if handed_back:
        # The rows still ours go back without spending the attempt; the others are another relay's.
        log.info("relay %s: handing back %d row(s) after a lease was lost", instance_id, len(handed_back))
        await system.db.execute(RELEASE_SQL, handed_back, instance_id)


def _compensation(system: System, row, summary: str) -> dead_letters.Compensation | None:
    """The row's subscription's `on_dead_letter`, bound to the row's event and envelope and the
    failure's summary (`error`), within the relay's handler timeout; None if it declares none."""
    bound = system.subscriptions.get(row["subscriber"])
    if bound is None or bound.compensator is None:
        return None
    compensator, timeout = bound.compensator, system.settings.relay_handler_timeout

    async def run(uow) -> None:
        event, envelope, _ = open_row(system.catalog, row)
        async with asyncio.timeout(timeout):
            await compensator(event, uow=uow, envelope=envelope, error=summary)

    return dead_letters.Compensation(system.uow, run)


