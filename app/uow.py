"""Unit of work: a transaction, an identity map of the aggregates it loaded (app/eventstore.py
replays them), and a commit that runs the inline projections of their new events, appends the
events with one outbox row per (event, subscriber) and the staged module-table rows, in one
statement, then wakes the relays."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import asyncpg

from app import observe
from app.aggregate import Aggregate
from app.db import Database
from app.eventstore import LOAD_MANY_SQL, EventCatalog, append, load_sql, replay, replay_many
from app.messages import Event, NotFound
from app.staging import Staged, columns_of, merged, stage_entry, staged_insert

A = TypeVar("A", bound=Aggregate)


class UnitOfWork:
    """One per message. `async with uow:` nests: only the outermost `commit()` ends the transaction,
    so the relay can wrap a subscriber's work and its acknowledgement in one transaction."""

    def __init__(self, db: Database, catalog: EventCatalog) -> None:
        self._db = db
        self._catalog = catalog
        self._conn: asyncpg.Connection | None = None
        self._tx: Any = None
        self._depth = 0
        self._seen: dict[tuple[type, Any], Aggregate] = {}
        self.positions: list[int] = []
        self._published = False  # outbox rows written, to announce once the transaction commits
        self._parent: UnitOfWork | None = None
        self._staged: list[Staged] = []
        self._projecting = False  # inline projections are running (project)

    def child(self) -> UnitOfWork:
        """A unit inside this unit's open transaction, with its own identity map, that writes at
        its own commit; the writes commit with this unit. The relay's careful path gives one to
        each delivery, so a failed delivery (rolled back to its savepoint) leaves no stale
        aggregate behind for the next."""
        assert self._tx is not None, "begin the transaction first: await uow.transaction()"
        child = UnitOfWork(self._db, self._catalog)
        child._conn, child._tx, child._depth, child._parent = self._conn, self._tx, 1, self
        return child

    async def __aenter__(self) -> UnitOfWork:
        if self._depth == 0:
            self._conn = await self._db.pool.acquire()
        self._depth += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth:
            return
        try:
            if self._tx is not None:
                await self._tx.rollback()  # never committed: nothing is published
        finally:
            self._tx = None
            self._published = False
            self._seen.clear()
            self._staged.clear()
            conn, self._conn = self._conn, None
            await self._db.pool.release(conn)

    @property
    def connection(self) -> asyncpg.Connection:
        """For reads; `await transaction()` before writing module tables."""
        assert self._conn is not None, "use `async with uow:`"
        return self._conn

    async def transaction(self) -> asyncpg.Connection:
        """The connection inside this unit's transaction (begun on first call); writes made
        through it commit or roll back together with the events."""
        if self._tx is None:
            self._tx = self.connection.transaction()
            await self._tx.start()
        if self._projecting and self._staged:
            # A projection about to write sees the rows staged before it (e.g. OrderPlaced's view
            # row, then OrderPaid's update of it, in one commit): written now, not at the append.
            staged, self._staged = self._staged, []
            for entry in merged(staged):
                await self._conn.execute(staged_insert(entry, 1), *columns_of([entry]))
        return self._conn

    async def get(self, cls: type[A], id: Any) -> A:
        aggregate = await self.find(cls, id)
        if aggregate is None:
            raise NotFound(f"{cls.__name__} {id} does not exist")
        return aggregate

    async def find(self, cls: type[A], id: Any) -> A | None:
        key = (cls, id)
        if key in self._seen:
            return self._seen[key]  # type: ignore[return-value]
        rows = await self.connection.fetch(load_sql(cls), cls.stream_id_for(id))
        aggregate = replay(self._catalog, cls, id, rows)
        if aggregate is not None:
            self._seen[key] = aggregate
        return aggregate

    async def get_many(self, cls: type[A], ids: Sequence[Any]) -> list[A]:
        """The aggregates of `ids`, in that order: the streams not in the identity map loaded in
        one SELECT (aggregates with snapshots: one load each). NotFound if one is empty."""
        found = await self.find_many(cls, ids)
        for id, aggregate in zip(ids, found, strict=True):
            if aggregate is None:
                raise NotFound(f"{cls.__name__} {id} does not exist")
        return found  # type: ignore[return-value]

    async def find_many(self, cls: type[A], ids: Sequence[Any]) -> list[A | None]:
        """Like `get_many`, but an empty stream's aggregate comes back as None, not NotFound."""
        missing = list(dict.fromkeys(id for id in ids if (cls, id) not in self._seen))
        if missing and cls.snapshot_every:
            for id in missing:
                await self.find(cls, id)
        elif missing:
            rows = await self.connection.fetch(LOAD_MANY_SQL, [cls.stream_id_for(id) for id in missing])
            for id, aggregate in replay_many(self._catalog, cls, missing, rows).items():
                self._seen[(cls, id)] = aggregate
        return [self._seen.get((cls, id)) for id in ids]  # type: ignore[misc]

    def add(self, aggregate: Aggregate) -> None:
        self._seen[(type(aggregate), aggregate.id)] = aggregate

    def stage(self, table: str, columns: Mapping[str, str], rows: Iterable[Sequence[Any]]) -> None:
        """Insert `rows` into a module table (`columns`: name -> PostgreSQL type) on the next
        commit: with its events in the same statement -- one round trip, no explicit transaction,
        committed or rolled back together -- or, without events, in a statement of their own (in a
        relay's fast run: with the whole run's rows for that table, set-based). Staged rows are
        not visible before that commit, not even to this unit. Rows that conflict with existing
        ones are skipped (ON CONFLICT DO NOTHING). Table and column names are code, never input:
        checked (app/staging.py)."""
        entry = stage_entry(table, columns, rows)
        if entry is not None:
            self._staged.append(entry)

    async def project(self, events: Iterable[Event]) -> None:
        """Run the inline projections of `events` (app/wiring.py Module.projections), in order, in
        this unit: what they stage rides in the append, what they write through `transaction()`
        commits with it (and sees every row staged before), and what they raise fails the commit
        (nothing is written)."""
        projections = self._catalog.projections
        self._projecting = True
        try:
            for event in events:
                for projection in projections.get(type(event), ()):
                    await projection(event, uow=self)
        finally:
            self._projecting = False

    async def commit(self) -> None:
        """Write what the unit holds (events and staged rows), then, for the outermost unit, end
        the transaction and wake the relays if outbox rows were written."""
        with observe.span("commit"):  # NOTHING with tracing off
            # One lock order for every unit: two units touching the same streams queue, not deadlock.
            pending = sorted((a for a in self._seen.values() if a.pending_events), key=lambda a: a.stream_id)
            if pending and self._catalog.projections:
                for aggregate in pending:
                    await self.project(aggregate.pending_events)
            if pending or self._staged:
                staged, self._staged = self._staged, []
                if self._depth > 1 or self._tx is not None:
                    await self.transaction()
                if not pending:
                    for entry in merged(staged):
                        await self.connection.execute(staged_insert(entry, 1), *columns_of([entry]))
                elif await append(self.connection, self._catalog, pending, merged(staged), self.positions):
                    self._published = True
                    if self._parent is not None:
                        self._parent._published = True
            if self._depth <= 1 and self._parent is None:  # a child's writes commit with its parent
                if self._tx is not None:
                    tx, self._tx = self._tx, None
                    await tx.commit()
                if self._published:
                    self._published = False
                    self._db.outbox_written()  # committed: wake the relays
