"""The fast path: a run of one subscriber's deliveries in one transaction without savepoints,
its events appended in one statement (app/eventstore.py) with the rows its handlers staged, its
acknowledgement in another, one COMMIT."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import asyncpg

from app.aggregate import Aggregate
from app.db import Database
from app.eventstore import EventCatalog, append, event_metadata
from app.messages import ConcurrencyError
from app.relay.ack import held_all
from app.relay.settle import Outcome
from app.staging import Staged, columns_of, merged, staged_insert
from app.uow import UnitOfWork

if TYPE_CHECKING:
    from app.relay.delivery import Delivery


class HandlerFailed(Exception):
    """A handler failed in a fast run (which then rolled back): which row of the rows the group
    had left when the run began, why, after how long."""

    def __init__(self, index: int, error: BaseException, seconds: float) -> None:
        self.index, self.error, self.seconds = index, error, seconds


class BatchFailed(Exception):
    """A batch subscription's handler failed in a fast run (which then rolled back): which of its
    rows failed is unknown, so each is delivered on its own."""

    def __init__(self, error: BaseException, seconds: float = 0.0) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error, self.seconds = error, seconds


class _Run:
    """What a run's deliveries share: the connection in its transaction, one identity map, the
    rows they staged, and whether any recorded events."""

    __slots__ = ("db", "catalog", "conn", "tx", "seen", "staged", "decided", "stamps")

    def __init__(self, db: Database, catalog: EventCatalog, conn: asyncpg.Connection, tx) -> None:
        self.db, self.catalog, self.conn, self.tx = db, catalog, conn, tx
        self.seen: dict[tuple[type, object], Aggregate] = {}
        self.staged: list[Staged] = []
        self.decided = False
        self.stamps: dict[int, list[str]] = {}  # id(aggregate) -> each pending event's metadata


class RunUnit(UnitOfWork):
    """A delivery's unit in a fast run: the run's connection, transaction and identity map, so a
    later delivery that loads a stream an earlier one changed gets that aggregate, its new events
    included. Its commit writes nothing: it hands its staged rows to the run, which appends every
    delivery's events with them when it commits (or rolls them all back)."""

    def __init__(self, run: _Run) -> None:
        super().__init__(run.db, run.catalog)
        self._conn, self._tx, self._depth, self._seen = run.conn, run.tx, 1, run.seen
        self._run = run

    async def commit(self) -> None:
        """Run the inline projections of the events this delivery recorded, hand the staged rows
        to the run, and stamp those events with this delivery's own correlation and causation ids
        (the run appends them later, in another's context)."""
        run = self._run
        metadata = None
        for aggregate in self._seen.values():
            pending = len(aggregate.pending_events)
            marks = run.stamps.get(id(aggregate))
            if pending and (marks is None or len(marks) < pending):
                await self.project(aggregate.pending_events[len(marks or ()) :])  # new since the last commit
                metadata = metadata or event_metadata()
                marks = run.stamps.setdefault(id(aggregate), [])
                marks.extend([metadata] * (pending - len(marks)))
                run.decided = True
        run.staged.extend(self._staged)
        self._staged = []


async def run(
    delivery: Delivery, subscriber: str, rows: list, seen: set, hold_seconds: float
) -> tuple[list[Outcome], list]:
    """The handlers in turn in one transaction (a batch subscription's once, for every row),
    sharing one identity map and writing nothing themselves; then the acknowledgement in one
    statement, every event the handlers recorded in one append (with the rows they staged), one
    COMMIT. Once a handler has
    recorded events, the run ends as soon as it has taken `hold_seconds`, returning the rest: its
    decisions rest on the streams it loaded, and the longer they wait for the append, the likelier
    another writer (e.g. POST /orders reserving stock) changed one first. A handler error -- or a
    lost race at the append -- rolls the whole run back and raises `HandlerFailed` (a batch
    handler's error: `BatchFailed`). Returns the outcomes and the rows left for the next run."""
    bound = delivery.system.subscriptions.get(subscriber)
    db = delivery.db
    began = time.perf_counter()
    async with db.pool.acquire() as conn:
        tx = conn.transaction()
        async with tx:
            shared = _Run(db, delivery.system.catalog, conn, tx)
            if bound is not None and bound.handler is not None and bound.subscription.batch:
                outcomes = await _batch(delivery, bound, RunUnit(shared), rows, seen)
            else:
                outcomes = await _each(delivery, bound, shared, rows, seen, hold_seconds, began)
            ids = [o.row["id"] for o in outcomes]
            acknowledged = await delivery.acknowledge(conn, ids)
            held_all(acknowledged, ids)  # else roll the run back: a stalled relay commits nothing
            published = await _write(shared, outcomes, began)
        if published:
            db.outbox_written()  # committed: wake the relays
    delivery.delivered += acknowledged
    return outcomes, rows[len(outcomes) :]


async def _each(
    delivery: Delivery, bound, shared: _Run, rows: list, seen: set, hold_seconds: float, began: float
) -> list[Outcome]:
    """The handler once per row, each with a unit of its own over the run's identity map, until
    the run has held recorded events `hold_seconds`. Raises HandlerFailed at the first failure."""
    outcomes: list[Outcome] = []
    for i, row in enumerate(rows):
        started = time.perf_counter()
        if row["message_id"] not in seen:  # else applied before: just acknowledge
            try:
                async with asyncio.timeout(delivery.handler_timeout):
                    await delivery.apply(bound, RunUnit(shared), row)
            except Exception as error:
                raise HandlerFailed(i, error, time.perf_counter() - started) from error
            outcomes.append(Outcome(row, None, time.perf_counter() - started))
            if shared.decided and time.perf_counter() - began >= hold_seconds:
                break
        else:
            outcomes.append(Outcome(row, None, time.perf_counter() - started))
    return outcomes


async def _batch(delivery: Delivery, bound, uow: RunUnit, rows: list, seen: set) -> list[Outcome]:
    """A batch subscription's run: its handler once, for the rows not applied before. Raises
    BatchFailed if it fails (the run rolls back; each row is then delivered on its own)."""
    started = time.perf_counter()
    todo = [row for row in rows if row["message_id"] not in seen]
    if todo:
        try:
            async with asyncio.timeout(delivery.handler_timeout):
                await delivery.apply_batch(bound, uow, todo)
        except Exception as error:
            raise BatchFailed(error, time.perf_counter() - started) from error
    seconds = (time.perf_counter() - started) / len(rows)
    return [Outcome(row, None, seconds) for row in rows]


async def _write(shared: _Run, outcomes: list[Outcome], began: float) -> int:
    """The run's events with its staged rows, or its staged rows alone. Returns the outbox rows
    written."""
    # One lock order for every writer: two touching the same streams queue, not deadlock.
    pending = sorted((a for a in shared.seen.values() if a.pending_events), key=lambda a: a.stream_id)
    if not pending:
        for entry in merged(shared.staged):
            await shared.conn.execute(staged_insert(entry, 1), *columns_of([entry]))
        return 0
    try:
        return await append(shared.conn, shared.catalog, pending, merged(shared.staged), [], shared.stamps)
    except ConcurrencyError as error:  # a stream changed since a handler loaded it
        raise HandlerFailed(len(outcomes) - 1, error, time.perf_counter() - began) from error
