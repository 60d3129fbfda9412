"""The event store: the catalog of event types, and the functions over an asyncpg connection that
load a stream (snapshot + replay) and append events with their outbox rows (and any staged rows,
app/staging.py) in one statement."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import asyncpg
import msgspec

from app import context, observe
from app.aggregate import Aggregate
from app.messages import ConcurrencyError, Event
from app.staging import Staged, columns_of, staged_insert

A = TypeVar("A", bound=Aggregate)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class EventCatalog:
    """Every event type by topic, the subscription names each one fans out to, and the inline
    projections (bound, `await p(event, uow=uow)`) a unit runs for it before appending it."""

    def __init__(
        self,
        subscribers: Mapping[type[Event], Sequence[str]],
        types: Sequence[type[Event]] = (),
        projections: Mapping[type[Event], Sequence[Any]] | None = None,
    ):
        self.types: dict[str, type[Event]] = {t.topic(): t for t in (*types, *subscribers)}
        self.subscribers: dict[type[Event], tuple[str, ...]] = {t: tuple(s) for t, s in subscribers.items()}
        self.projections: dict[type[Event], tuple[Any, ...]] = {t: tuple(p) for t, p in (projections or {}).items()}
        self._decoders = {topic: msgspec.json.Decoder(t) for topic, t in self.types.items()}

    def decode(self, topic: str, data: str | bytes) -> Event:
        try:
            return self._decoders[topic].decode(data)
        except KeyError:
            raise LookupError(f"unknown event type {topic!r}: is its module in MODULES?") from None


# One round trip: events and their outbox rows. Positions come back in stream order. The relays
# are woken after the commit (Database.outbox_written), not by a NOTIFY inside this transaction:
# NOTIFY takes a database-wide lock held through the commit's WAL flush, serialising every
# appending transaction.
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
# joins (less client and server CPU on the request path; BENCHMARKS.md). Returns the position and
# the outbox rows written.
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

LOAD_SQL = "SELECT type, data FROM events WHERE stream_id = $1 ORDER BY version"

# Several streams in one round trip (UnitOfWork.get_many): a batch subscriber's N loads as one.
LOAD_MANY_SQL = """
SELECT stream_id, type, data FROM events WHERE stream_id = ANY($1::text[]) ORDER BY stream_id, version
"""

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


def load_sql(cls: type[Aggregate]) -> str:
    """The statement that loads a stream of `cls`: `await conn.fetch(load_sql(cls), stream_id)`,
    then `replay` the rows (two steps, so a loader awaits the database and nothing else)."""
    return LOAD_FROM_SNAPSHOT_SQL if cls.snapshot_every else LOAD_SQL


def replay(catalog: EventCatalog, cls: type[A], id: Any, rows: list) -> A | None:
    """The aggregate from the rows `load_sql(cls)` returned: from its snapshot, if it has one,
    and the events after it; None for an empty stream."""
    if not rows:
        return None
    if rows[0]["type"] is None:
        events = [catalog.decode(r["type"], r["data"]) for r in rows[1:]]
        return cls.from_snapshot(id, rows[0]["version"], _decode(rows[0]["data"]), events)
    return cls.rehydrate(id, [catalog.decode(r["type"], r["data"]) for r in rows])


def replay_many(catalog: EventCatalog, cls: type[A], ids: list, rows: list) -> dict[Any, A]:
    """The aggregates of `ids` from the rows LOAD_MANY_SQL returned for their streams, by id;
    an empty stream's id is left out."""
    by_stream: dict[str, list] = {}
    for row in rows:
        by_stream.setdefault(row["stream_id"], []).append(row)
    loaded = {}
    for id in ids:
        aggregate = replay(catalog, cls, id, by_stream.get(cls.stream_id_for(id), []))
        if aggregate is not None:
            loaded[id] = aggregate
    return loaded


# Staged rows ride in the append statement as more data-modifying CTEs: one round trip, and they
# commit or fail with the events.
_append_sql: dict[tuple, str] = {}


def append_with(staged: list[Staged], *, one: bool = False) -> str:
    """The append statement (APPEND_ONE_CTES for one event, APPEND_CTES for any number) with the
    staged rows' inserts, built once per shape."""
    key = (one, *((s.table, s.columns, len(s.rows) == 1) for s in staged))
    sql = _append_sql.get(key)
    if sql is None:
        ctes, param = [], (APPEND_ONE_PARAMS if one else APPEND_PARAMS) + 1
        for i, entry in enumerate(staged):
            ctes.append(f", staged_{i} AS ({staged_insert(entry, param)})")
            param += len(entry.columns)
        head, tail = (APPEND_ONE_CTES, APPEND_ONE_RESULT) if one else (APPEND_CTES, APPEND_RESULT)
        sql = _append_sql[key] = head + "".join(ctes) + tail
    return sql


def event_metadata() -> str:
    """The metadata an event recorded now carries: the correlation and causation ids of the
    message being handled, and with tracing on the span recording it (the relay's delivery
    spans are its children, app/observe.py)."""
    metadata = {"correlation_id": context.current_correlation_id(), "causation_id": context.causation_id.get()}
    if observe.TRACING:
        metadata["traceparent"] = observe.traceparent()
    return _encode(metadata).decode()


async def append(
    conn: asyncpg.Connection,
    catalog: EventCatalog,
    aggregates: list[Aggregate],
    staged: list[Staged],
    positions: list[int],
    stamps: Mapping[int, list[str]] | None = None,
) -> int:
    """Append the aggregates' pending events (and the merged `staged` rows) in one statement,
    with one outbox row per (event, subscriber), then their due snapshots. Adds the events'
    positions to `positions`; returns how many outbox rows were written. A stream written since
    it was loaded raises ConcurrencyError.

    Events carry the metadata of the message being handled now, unless `stamps` (by `id()` of
    the aggregate) gives each of its pending events its own: a relay's fast run appends the
    events of several deliveries at once, and each must keep the ids of the delivery that
    recorded it."""
    metadata = event_metadata()
    ids, streams, versions, types, datas, metas, sub_ids, sub_names = [], [], [], [], [], [], [], []
    snapshots: tuple[list, list, list] = ([], [], [])
    for aggregate in aggregates:
        version = aggregate.stored_version
        every = aggregate.snapshot_every
        if every and version // every != aggregate.version // every:  # crosses a multiple of N
            snapshots[0].append(aggregate.stream_id)
            snapshots[1].append(aggregate.version)
            snapshots[2].append(_encode(aggregate.snapshot()).decode())
        marks = stamps.get(id(aggregate), ()) if stamps else ()
        for i, event in enumerate(aggregate.collect_events()):
            metas.append(marks[i] if i < len(marks) else metadata)
            version += 1
            event_id = uuid.uuid4()
            ids.append(event_id)
            streams.append(aggregate.stream_id)
            versions.append(version)
            types.append(event.topic())
            datas.append(_encode(event).decode())
            for subscriber in catalog.subscribers.get(type(event), ()):
                sub_ids.append(event_id)
                sub_names.append(subscriber)
    one = len(ids) == 1  # the usual case: plain parameters (APPEND_ONE_CTES), not arrays
    events = (
        (ids[0], streams[0], versions[0], types[0], datas[0], metas[0], sub_names)
        if one
        else (ids, streams, versions, types, datas, metas, sub_ids, sub_names)
    )
    try:
        appended, outbox_rows = await conn.fetchrow(
            append_with(staged, one=one), *events, *columns_of(staged)
        )
    except asyncpg.UniqueViolationError as error:
        if error.constraint_name == "events_stream_version":
            raise ConcurrencyError(f"stream changed concurrently: {error.detail}") from None
        raise
    except asyncpg.DeadlockDetectedError as error:
        # Units that append in several statements (nested) can still wait on each other;
        # PostgreSQL aborts one, which decides again on fresh state like any other conflict.
        raise ConcurrencyError(f"deadlock with a concurrent writer: {error.detail or error}") from None
    if one:
        positions.append(appended)
    else:
        positions.extend(appended)
    if snapshots[0]:
        await conn.execute(SNAPSHOT_SQL, *snapshots)
    return outbox_rows
