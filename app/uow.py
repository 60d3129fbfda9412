"""Unit of work: load aggregates by replay, then append their events and one outbox row per
(event, subscriber) in one statement, in one transaction, with a NOTIFY that fires on commit."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import msgspec

from app import context
from app.aggregate import Aggregate
from app.db import Database
from app.eventstore import EventCatalog
from app.messages import ConcurrencyError, NotFound

A = TypeVar("A", bound=Aggregate)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

# One round trip: events and their outbox rows. Positions come back in stream order. The relays
# are woken after the commit (Database.outbox_written), not by a NOTIFY inside this transaction:
# NOTIFY takes a database-wide lock held through the commit's WAL flush, serialising every
# appending transaction (measured: 12-15k commits/s fall to ~3.8k with a NOTIFY in each).
APPEND_CTES = """
WITH ev AS (
    INSERT INTO events (event_id, stream_id, version, type, data, metadata)
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::jsonb[], $6::jsonb[])
    RETURNING position, event_id, stream_id, type, data, metadata
), ob AS (
    INSERT INTO outbox (message_id, position, subscriber, type, partition_key, payload, headers)
    SELECT ev.event_id, ev.position, s.subscriber, ev.type, ev.stream_id, ev.data, ev.metadata
    FROM unnest($7::uuid[], $8::text[]) AS s(event_id, subscriber)
    JOIN ev ON ev.event_id = s.event_id
    ORDER BY ev.position
    RETURNING 1
)"""
APPEND_RESULT = """
SELECT array_agg(position ORDER BY position), (SELECT count(*) FROM ob)
FROM ev
"""
APPEND_SQL = APPEND_CTES + APPEND_RESULT
APPEND_PARAMS = 8

# The same for one event, the usual case (a command records one event): plain parameters instead
# of one-element arrays, which asyncpg encodes element by element and PostgreSQL unnests and
# joins (bench.drain: a tenth less client CPU and a fifth less PostgreSQL CPU on the request
# path). Returns the position and the outbox rows written.
APPEND_ONE_CTES = """
WITH ev AS (
    INSERT INTO events (event_id, stream_id, version, type, data, metadata)
    VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb)
    RETURNING position, event_id, stream_id, type, data, metadata
), ob AS (
    INSERT INTO outbox (message_id, position, subscriber, type, partition_key, payload, headers)
    SELECT ev.event_id, ev.position, s.subscriber, ev.type, ev.stream_id, ev.data, ev.metadata
    FROM ev CROSS JOIN unnest($7::text[]) AS s(subscriber)
    RETURNING 1
)"""
APPEND_ONE_RESULT = """
SELECT position, (SELECT count(*) FROM ob)
FROM ev
"""
APPEND_ONE_PARAMS = 7

# Staged rows (UnitOfWork.stage) ride in the append statement as more data-modifying CTEs: one
# round trip, and they commit or fail with the events.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE = re.compile(r"[a-z_][a-z0-9_ ]*")
_append_sql: dict[tuple, str] = {}


@dataclass(frozen=True)
class _Staged:
    table: str
    columns: tuple[tuple[str, str], ...]  # (name, PostgreSQL type)
    rows: tuple[tuple, ...]


def _staged_insert(staged: _Staged, first_param: int) -> str:
    """The insert of an entry's rows: one row as plain parameters, more as one array per column
    (see _columns_of)."""
    names = ", ".join(f'"{name}"' for name, _ in staged.columns)
    if len(staged.rows) == 1:
        values = ", ".join(f"${first_param + i}::{kind}" for i, (_, kind) in enumerate(staged.columns))
        return f'INSERT INTO "{staged.table}" ({names}) VALUES ({values}) ON CONFLICT DO NOTHING'
    arrays = ", ".join(f"${first_param + i}::{kind}[]" for i, (_, kind) in enumerate(staged.columns))
    return f'INSERT INTO "{staged.table}" ({names}) SELECT * FROM unnest({arrays}) ON CONFLICT DO NOTHING'


def _append_with(staged: list[_Staged], *, one: bool = False) -> str:
    """The append statement (APPEND_ONE_CTES for one event, APPEND_CTES for any number) with the
    staged rows' inserts, built once per shape."""
    key = (one, *((s.table, s.columns, len(s.rows) == 1) for s in staged))
    sql = _append_sql.get(key)
    if sql is None:
        ctes, param = [], (APPEND_ONE_PARAMS if one else APPEND_PARAMS) + 1
        for i, entry in enumerate(staged):
            ctes.append(f", staged_{i} AS ({_staged_insert(entry, param)})")
            param += len(entry.columns)
        head, tail = (APPEND_ONE_CTES, APPEND_ONE_RESULT) if one else (APPEND_CTES, APPEND_RESULT)
        sql = _append_sql[key] = head + "".join(ctes) + tail
    return sql


def _merged(staged: list[_Staged]) -> list[_Staged]:
    """Entries for the same table and columns as one, rows in staging order."""
    by_shape: dict[tuple, list[tuple]] = {}
    for entry in staged:
        by_shape.setdefault((entry.table, entry.columns), []).extend(entry.rows)
    return [_Staged(table, columns, tuple(rows)) for (table, columns), rows in by_shape.items()]


def _columns_of(staged: list[_Staged]) -> list:
    """The staged rows in statement parameter order: an entry's one row as its values, more rows
    as one array per column (see _staged_insert)."""
    params: list = []
    for entry in staged:
        if len(entry.rows) == 1:
            params.extend(entry.rows[0])
        else:
            params.extend([row[i] for row in entry.rows] for i in range(len(entry.columns)))
    return params

LOAD_SQL = "SELECT type, data FROM events WHERE stream_id = $1 ORDER BY version"

# For aggregates with snapshots: the latest snapshot (type NULL) first, then the events after it.
LOAD_FROM_SNAPSHOT_SQL = """
SELECT NULL::text AS type, state AS data, version FROM snapshots WHERE stream_id = $1
UNION ALL
SELECT type, data, version FROM events
WHERE stream_id = $1 AND version > coalesce((SELECT version FROM snapshots WHERE stream_id = $1), 0)
ORDER BY version
"""

# A snapshot is a cache of state at a committed version: written after its events, never newer
# than what the store holds, replaced only by a later one.
SNAPSHOT_SQL = """
INSERT INTO snapshots (stream_id, version, state)
SELECT * FROM unnest($1::text[], $2::int[], $3::jsonb[])
ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, state = excluded.state, taken_at = now()
WHERE snapshots.version < excluded.version
"""


class UnitOfWork:
    """One per message. `async with uow:` nests: only the outermost `commit()` ends the transaction,
    so the relay can wrap a subscriber's work and its inbox row in one transaction."""

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
        self._staged: list[_Staged] = []
        self._deferred = False  # a relay fast run's delivery: its parent writes everything
        self.deferred_events = False  # it committed events its parent will append

    def child(self, *, deferred: bool = False) -> UnitOfWork:
        """A unit inside this unit's open transaction. The relay gives one to each delivery of a
        batch: the delivery's writes commit with the batch.

        By default the child has its own identity map and writes at its own commit, so a failed
        delivery (rolled back to its savepoint) leaves no stale aggregate behind for the next.
        `deferred` (the relay's fast runs, whose deliveries commit or roll back all together):
        the child shares this unit's identity map, and its commit writes nothing -- this unit
        appends every child's events in one statement, with the rows they staged (one statement
        per table), when it commits. A later delivery that loads a stream an earlier one changed
        gets that aggregate, its new events included."""
        assert self._tx is not None, "begin the transaction first: await uow.transaction()"
        child = UnitOfWork(self._db, self._catalog)
        child._conn, child._tx, child._depth, child._parent = self._conn, self._tx, 1, self
        if deferred:
            child._deferred, child._seen = True, self._seen
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
        if cls.snapshot_every:
            rows = await self.connection.fetch(LOAD_FROM_SNAPSHOT_SQL, cls.stream_id_for(id))
            if rows and rows[0]["type"] is None:
                events = [self._catalog.decode(r["type"], r["data"]) for r in rows[1:]]
                aggregate = cls.from_snapshot(id, rows[0]["version"], _decode(rows[0]["data"]), events)
                self._seen[key] = aggregate
                return aggregate
        else:
            rows = await self.connection.fetch(LOAD_SQL, cls.stream_id_for(id))
        if not rows:
            return None
        aggregate = cls.rehydrate(id, [self._catalog.decode(r["type"], r["data"]) for r in rows])
        self._seen[key] = aggregate
        return aggregate

    def add(self, aggregate: Aggregate) -> None:
        self._seen[(type(aggregate), aggregate.id)] = aggregate

    def stage(self, table: str, columns: Mapping[str, str], rows: Iterable[Sequence[Any]]) -> None:
        """Insert `rows` into a module table (`columns`: name -> PostgreSQL type) on the next
        commit: with its events in the same statement -- one round trip, no explicit transaction,
        committed or rolled back together -- or, without events, in a statement of their own (in a
        relay's fast run: with the whole run's rows for that table, set-based). Staged rows are
        not visible before that commit, not even to this unit. Rows that conflict with existing
        ones are skipped (ON CONFLICT DO NOTHING). Table and column names are code, never input:
        checked here."""
        for name in (table, *columns):
            if not _IDENTIFIER.fullmatch(name):
                raise ValueError(f"not a plain lower-case SQL identifier: {name!r}")
        for kind in columns.values():
            if not _TYPE.fullmatch(kind):
                raise ValueError(f"not a plain SQL type name: {kind!r}")
        rows = tuple(tuple(row) for row in rows)
        if rows:
            self._staged.append(_Staged(table, tuple(columns.items()), rows))

    async def commit(self) -> None:
        if self._deferred:  # the parent appends the shared map's events and writes the staged rows
            self._parent._staged.extend(self._staged)  # type: ignore[union-attr]
            self._staged = []
            self.deferred_events = self.deferred_events or any(a.pending_events for a in self._seen.values())
            return
        # One lock order for every unit: two units touching the same streams queue, not deadlock.
        pending = sorted((a for a in self._seen.values() if a.pending_events), key=lambda a: a.stream_id)
        if pending or self._staged:
            staged, self._staged = self._staged, []
            if self._depth > 1 or self._tx is not None:
                await self.transaction()
            if pending:
                self.positions.extend(await self._append(pending, _merged(staged)))
            else:
                for entry in _merged(staged):
                    await self.connection.execute(_staged_insert(entry, 1), *_columns_of([entry]))
        if self._depth <= 1 and self._parent is None:  # a child's writes commit with its parent
            if self._tx is not None:
                tx, self._tx = self._tx, None
                await tx.commit()
            if self._published:
                self._published = False
                self._db.outbox_written()  # committed: wake the relays

    async def _append(self, aggregates: list[Aggregate], staged: list[_Staged]) -> list[int]:
        metadata = _encode(
            {"correlation_id": context.current_correlation_id(), "causation_id": context.causation_id.get()}
        ).decode()
        ids, streams, versions, types, datas, sub_ids, sub_names = [], [], [], [], [], [], []
        snapshots: tuple[list, list, list] = ([], [], [])
        for aggregate in aggregates:
            version = aggregate.stored_version
            every = aggregate.snapshot_every
            if every and version // every != aggregate.version // every:  # crosses a multiple of N
                snapshots[0].append(aggregate.stream_id)
                snapshots[1].append(aggregate.version)
                snapshots[2].append(_encode(aggregate.snapshot()).decode())
            for event in aggregate.collect_events():
                version += 1
                event_id = uuid.uuid4()
                ids.append(event_id)
                streams.append(aggregate.stream_id)
                versions.append(version)
                types.append(event.topic())
                datas.append(_encode(event).decode())
                for subscriber in self._catalog.subscribers.get(type(event), ()):
                    sub_ids.append(event_id)
                    sub_names.append(subscriber)
        one = len(ids) == 1  # the usual case: plain parameters (APPEND_ONE_CTES), not arrays
        events = (
            (ids[0], streams[0], versions[0], types[0], datas[0], metadata, sub_names)
            if one
            else (ids, streams, versions, types, datas, [metadata] * len(ids), sub_ids, sub_names)
        )
        try:
            appended, outbox_rows = await self.connection.fetchrow(
                _append_with(staged, one=one), *events, *_columns_of(staged)
            )
        except asyncpg.UniqueViolationError as error:
            if error.constraint_name == "events_stream_version":
                raise ConcurrencyError(f"stream changed concurrently: {error.detail}") from None
            raise
        except asyncpg.DeadlockDetectedError as error:
            # Units that append in several statements (nested) can still wait on each other;
            # PostgreSQL aborts one, which decides again on fresh state like any other conflict.
            raise ConcurrencyError(f"deadlock with a concurrent writer: {error.detail or error}") from None
        positions = [appended] if one else appended
        if snapshots[0]:
            await self.connection.execute(SNAPSHOT_SQL, *snapshots)
        if outbox_rows:
            self._published = True
            if self._parent is not None:
                self._parent._published = True
        return positions
