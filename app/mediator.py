"""The mediator: one handler per command/query type, registered by the owning module, called
through behaviours — bulkhead, circuit breaker, deadline, conflict retry, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import UUID

import aiobreaker
import msgspec
from prometheus_client import Counter, Histogram

from app.messages import (
    Command,
    CommandRejected,
    ConcurrencyError,
    Event,
    NotFound,
    Query,
    SwitchboardError,
    Unavailable,
)

Handler = Callable[..., Awaitable[Any]]

_deadline: ContextVar[float | None] = ContextVar("switchboard_deadline", default=None)  # loop time
DEADLINE_MARGIN = 0.05  # seconds a nested call leaves its caller to answer

CALLS = Counter("switchboard_mediator_calls_total", "Mediator calls", ["module", "message", "outcome"])
LATENCY = Histogram(
    "switchboard_mediator_seconds",
    "Mediator call duration",
    ["module", "message"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5),
)


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """What a subscriber may know about the delivery besides the event (name it `envelope`)."""

    message_id: UUID
    position: int
    subscriber: str
    attempt: int
    headers: dict[str, Any]


@dataclass(frozen=True)
class Subscription:
    """A module's reaction to an event. `name` is stable: it is stored on every outbox row."""

    name: str
    handler: Handler
    max_attempts: int | None = None  # None: the relay's default
    retry_base_seconds: float | None = None
    retry_cap_seconds: float | None = None

    @property
    def module(self) -> str:
        return self.name.split(".", 1)[0]


@dataclass
class Module:
    """What a module owns: its message handlers, its subscriptions, its HTTP controllers."""

    name: str
    commands: Mapping[type[Command], Handler] = field(default_factory=dict)
    queries: Mapping[type[Query], Handler] = field(default_factory=dict)
    subscriptions: Mapping[type[Event], Sequence[Subscription]] = field(default_factory=dict)
    controllers: Sequence[type] = ()
    events: Sequence[type[Event]] = ()  # events it publishes that no one subscribes to yet
    background: Sequence[Handler] = ()  # long-running tasks, dependencies injected like handlers
    providers: Mapping[str, Callable[[], Any]] = field(default_factory=dict)  # its own ports


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


class Bulkhead:
    """At most `limit` calls in flight for one module; beyond that, fail fast (503) instead of
    queueing without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0


class Route:
    __slots__ = ("module", "handler", "timeout", "breaker", "bulkhead", "_metrics")

    def __init__(self, module: str, handler, timeout, breaker, bulkhead, message: str) -> None:
        self.module = module
        self.handler = handler
        self.timeout = timeout
        self.breaker = breaker
        self.bulkhead = bulkhead
        self._metrics = (
            LATENCY.labels(module, message),
            {o: CALLS.labels(module, message, o) for o in ("ok", "rejected", "unavailable", "error")},
        )


class _OpenedAt(aiobreaker.CircuitBreakerListener):
    """When the breaker last opened, on the monotonic clock. aiobreaker stamps `opened_at` with
    utcnow() but measures `CircuitBreakerError.time_remaining` against local now(), so its answer
    is off by the zone's UTC offset (5 hours in New York, none at all in Tokyo)."""

    def __init__(self) -> None:
        self.at = 0.0

    def state_change(self, breaker, old, new) -> None:
        if new.state is aiobreaker.CircuitBreakerState.OPEN:
            self.at = time.monotonic()

    def retry_after(self, breaker: aiobreaker.CircuitBreaker) -> int:
        remaining = breaker.timeout_duration.total_seconds() - (time.monotonic() - self.at)
        return max(1, math.ceil(remaining))


def _business_error(module: str) -> Callable[[BaseException], bool]:
    """Errors that say nothing about the target module's health do not count against its breaker:
    business rejections, and a dependency's unavailability reported by another module."""

    def excluded(error: BaseException) -> bool:
        if isinstance(error, (CommandRejected, NotFound, ConcurrencyError)):
            return True
        return isinstance(error, Unavailable) and getattr(error, "module", module) != module

    return excluded


class Mediator:
    def __init__(
        self,
        handlers: Mapping[type, tuple[str, Callable[[Any], Awaitable[Any]]]],
        *,
        default_timeout: float = 5.0,
        breaker_fail_max: int = 5,
        breaker_reset_seconds: float = 30.0,
        bulkhead_limit: int = 200,
        conflict_retries: int = 30,
        local_modules: frozenset[str] | None = None,
    ) -> None:
        self.local_modules = local_modules  # None: every module runs in this process
        self.breakers: dict[str, aiobreaker.CircuitBreaker] = {}
        self.bulkheads: dict[str, Bulkhead] = {}
        self._opened: dict[str, _OpenedAt] = {}
        self.conflict_retries = conflict_retries
        self._routes: dict[type, Route] = {}
        for message_type, (module, handler) in handlers.items():
            if module not in self.breakers:
                self._opened[module] = _OpenedAt()
                self.breakers[module] = aiobreaker.CircuitBreaker(
                    fail_max=breaker_fail_max,
                    timeout_duration=timedelta(seconds=breaker_reset_seconds),
                    exclude=[_business_error(module)],
                    listeners=[self._opened[module]],
                    name=module,
                )
                self.bulkheads[module] = Bulkhead(bulkhead_limit)
            timeout = getattr(message_type, "timeout", None) or default_timeout
            self._routes[message_type] = Route(
                module, handler, timeout, self.breakers[module], self.bulkheads[module], message_type.__name__
            )

    async def send(self, command: Command) -> Any:
        """Run a command in the module that owns it; returns what its handler returns."""
        return await self._dispatch(command)

    async def ask(self, query: Query) -> Any:
        """Run a query in the module that owns it."""
        return await self._dispatch(query)

    def module_of(self, message_type: type) -> str:
        return self._routes[message_type].module

    async def dispatch_local(self, message: Command | Query) -> Any:
        """For the remote transport's receiving end: run only if the owning module is hosted
        here, so a misrouted call cannot bounce from process to process."""
        route = self._routes.get(type(message))
        if route is not None and self.local_modules is not None and route.module not in self.local_modules:
            raise Unavailable(f"module {route.module!r} is not hosted by this instance")
        return await self._dispatch(message)

    async def _dispatch(self, message: Any) -> Any:
        route = self._routes.get(type(message))
        if route is None:
            raise LookupError(f"no handler registered for {type(message).__name__}")
        latency, outcomes = route._metrics
        bulkhead = route.bulkhead
        if bulkhead.in_flight >= bulkhead.limit:
            outcomes["unavailable"].inc()
            raise _unavailable(route.module, f"module {route.module!r} is at its concurrency limit", 1)
        bulkhead.in_flight += 1
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await route.breaker.call_async(self._run, route, message)
            outcome = "ok"
            return result
        except aiobreaker.CircuitBreakerError as error:
            outcome = "unavailable"
            retry_after = self._opened[route.module].retry_after(route.breaker)
            raise _unavailable(route.module, f"module {route.module!r} is failing; circuit open", retry_after) from error
        except Unavailable:
            outcome = "unavailable"
            raise
        except SwitchboardError:
            outcome = "rejected"
            raise
        finally:
            bulkhead.in_flight -= 1
            latency.observe(time.perf_counter() - started)
            outcomes[outcome].inc()

    async def _run(self, route: Route, message: Any) -> Any:
        now = asyncio.get_running_loop().time()
        deadline = now + route.timeout
        outer = _deadline.get()
        if outer is not None:
            # A nested call ends before its caller's deadline, so a hung dependency times out as
            # *its* failure (its breaker counts it; the caller sees its Unavailable), not the caller's.
            deadline = min(deadline, outer - DEADLINE_MARGIN)
        token = _deadline.set(deadline)
        try:
            async with asyncio.timeout_at(deadline):
                for attempt in range(self.conflict_retries + 1):
                    try:
                        return await route.handler(message)
                    except ConcurrencyError:
                        if attempt == self.conflict_retries:
                            raise
                        # someone appended to the same stream first: reload and decide again
                        await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        except TimeoutError:
            raise _unavailable(
                route.module, f"{type(message).__name__} exceeded its {deadline - now:.3g}s deadline", 1
            ) from None
        finally:
            _deadline.reset(token)


def remaining_seconds() -> float | None:
    """Time left before the deadline of the mediator call in progress (None outside any)."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - asyncio.get_running_loop().time()


@contextlib.contextmanager
def deadline_in(seconds: float) -> Iterator[None]:
    """Run the calls inside under a caller's deadline (the remote transport's receiving end)."""
    token = _deadline.set(asyncio.get_running_loop().time() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def _unavailable(module: str, detail: str, retry_after: int) -> Unavailable:
    error = Unavailable(detail, retry_after=retry_after)
    error.module = module  # type: ignore[attr-defined]
    return error
