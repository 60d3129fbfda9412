"""Wiring records: what a module declares (its handlers, subscriptions, routes, tasks and ports)
and how a handler's dependencies are bound by parameter name."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from uuid import UUID

import msgspec

from app import context
from app.messages import Command, Event, Query

Handler = Callable[..., Awaitable[Any]]


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """What a subscriber may know about the delivery besides the event (name it `envelope`)."""

    message_id: UUID
    position: int
    subscriber: str
    attempt: int
    headers: dict[str, Any]


class BatchItem(NamedTuple):
    """One event of the run a batch subscription's handler is given, with its envelope."""

    event: Event
    envelope: Envelope

    @contextmanager
    def recording(self) -> Iterator[BatchItem]:
        """Make this item's correlation id (and its message, as causation) the context of what
        the handler records for it: record and `await uow.commit()` inside the block, so the
        item's events carry its ids and not another item's."""
        tokens = (
            context.correlation_id.set(self.envelope.headers.get("correlation_id")),
            context.causation_id.set(str(self.envelope.message_id)),
        )
        try:
            yield self
        finally:
            context.causation_id.reset(tokens[1])
            context.correlation_id.reset(tokens[0])


@dataclass(frozen=True)
class Subscription:
    """A module's reaction to an event. `name` is stable: it is stored on every outbox row.

    `batch`: the handler takes the run of events the relay gives it in one call -- a list of
    `BatchItem` (at most one per partition key, in outbox order) and `uow` -- and writes their
    effects set-based; they commit with the run's acknowledgement. If it raises, each item is
    delivered again on its own, as a one-item list in a savepoint of its own, so a failing event
    takes its own retry or dead-letter path and the others commit. Events it records must be
    recorded under `item.recording()`; it gets no `envelope` parameter (each item has its own).

    `on_dead_letter` compensates a delivery that ended in `dead_letters`: a handler (dependencies
    by parameter name; the relay passes `uow`, `envelope` and `error`, the failure's summary) whose
    events commit in the transaction that parks the row, so the business process ends in a
    defined state instead of waiting for an operator."""

    name: str
    handler: Handler
    max_attempts: int | None = None  # None: the relay's default
    retry_base_seconds: float | None = None
    retry_cap_seconds: float | None = None
    on_dead_letter: Handler | None = None
    batch: bool = False

    @property
    def module(self) -> str:
        return self.name.split(".", 1)[0]


@dataclass(frozen=True)
class StaleFallback:
    """How a query is answered while its module is unavailable (breaker open, bulkhead full,
    deadline passed, remote instance down, database down): with the last answer the *calling*
    process got to an equal query, passed through `mark`, which says it is stale (e.g.
    `lambda view: msgspec.structs.replace(view, stale=True)`). Never asked before: Unavailable
    still. The caller keeps at most `keep` answers (least recently answered go first)."""

    mark: Callable[[Any], Any]
    keep: int = 1024


@dataclass
class Module:
    """What a module owns: its message handlers, its subscriptions, its HTTP controllers."""

    name: str
    commands: Mapping[type[Command], Handler] = field(default_factory=dict)
    queries: Mapping[type[Query], Handler] = field(default_factory=dict)
    subscriptions: Mapping[type[Event], Sequence[Subscription]] = field(default_factory=dict)
    controllers: Sequence[type] = ()
    background: Sequence[Handler] = ()  # long-running tasks, dependencies injected like handlers
    providers: Mapping[str, Callable[[], Any]] = field(default_factory=dict)  # its own ports
    package: str | None = None  # where its commands/queries/events files live; None: modules.<name>
    fallbacks: Mapping[type[Query], StaleFallback] = field(default_factory=dict)  # queries only
    # Inline projections of its OWN events: run by the unit of work that appends such an event,
    # before the append and in its transaction (`projection(event, uow, ...)`; it may `uow.stage`
    # rows, which ride in the append statement, or write through `await uow.transaction()`), so
    # the read model is consistent at commit and no outbox row is written for it. Another
    # module's events are a subscription's business: bootstrap refuses them here.
    projections: Mapping[type[Event], Handler | Sequence[Handler]] = field(default_factory=dict)
    # Subscriptions that get no new outbox rows (their events are not routed to them any more,
    # e.g. replaced by an inline projection) but still deliver the rows already written.
    retired: Sequence[Subscription] = ()

    @property
    def contract_package(self) -> str:
        return self.package or f"modules.{self.name}"


def inject(
    handler: Handler, providers: Mapping[str, Callable[[], Any]], passed: Sequence[str] = ()
) -> Callable[..., Awaitable[Any]]:
    """Bind a handler's dependencies by parameter name (cosmicpython style). Providers run once
    per call, so each message gets a fresh UnitOfWork; names in `passed` come from the caller
    as keywords (the relay passes its own `uow`). Unknown names fail at start-up."""
    params = list(inspect.signature(handler).parameters)[1:]
    missing = [p for p in params if p not in providers and p not in passed]
    if missing:
        raise TypeError(f"{handler.__module__}.{handler.__qualname__} needs {missing}: no provider of that name")
    bound = [(p, providers[p]) for p in params if p not in passed]
    given = [p for p in params if p in passed]

    async def call(message: Any, **extra: Any) -> Any:
        kwargs = {name: provide() for name, provide in bound}
        for name in given:
            kwargs[name] = extra[name]
        return await handler(message, **kwargs)

    return call


def inject_task(task: Callable[..., Any], providers: Mapping[str, Callable[[], Any]]) -> Callable[[], Any]:
    """Bind every parameter of a background task (a coroutine function) by name."""
    params = list(inspect.signature(task).parameters)
    missing = [p for p in params if p not in providers]
    if missing:
        raise TypeError(f"{task.__module__}.{task.__qualname__} needs {missing}: no provider of that name")
    return lambda: task(**{p: providers[p]() for p in params})
