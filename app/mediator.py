"""The mediator: one handler per command/query type, registered by the owning module, called
through behaviours — bulkhead, circuit breaker, deadline, conflict retry, metrics.

Every call pays for all of them, so each is kept cheap on the path a healthy call takes
(bench/mediator_cost.py measures it): deadlines are enforced by one sweeper task instead of a timer
per call, aiobreaker runs only when a call fails or the breaker is not closed, and the metrics are
plain numbers read at scrape time."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar
from datetime import timedelta
from itertools import accumulate
from operator import attrgetter
from typing import Any, NoReturn

import aiobreaker
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from app.messages import (
    Command,
    CommandRejected,
    ConcurrencyError,
    NotFound,
    Query,
    SwitchboardError,
    Unavailable,
)

Handler = Callable[..., Awaitable[Any]]

_deadline: ContextVar[float | None] = ContextVar("switchboard_deadline", default=None)  # loop time
DEADLINE_MARGIN = 0.05  # seconds a nested call leaves its caller to answer
DEADLINE_RESOLUTION = 0.005  # seconds between sweeps: a call is cancelled at most this late

OUTCOMES = ("ok", "rejected", "unavailable", "error")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5)
_BUCKET_NAMES = [floatToGoString(bound) for bound in (*LATENCY_BUCKETS, math.inf)]


class CallStats:
    """Calls per outcome and their latency histogram for one (module, message type)."""

    __slots__ = ("outcomes", "buckets", "sum", "created")

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.buckets = [0] * len(_BUCKET_NAMES)  # not cumulative; the last one is +Inf
        self.sum = 0.0
        self.created = time.time()

    def record(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome] += 1
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bound >= seconds
        self.sum += seconds


class MediatorMetrics(Collector):
    """Exports every CallStats as the series prometheus_client's Counter and Histogram gave:
    switchboard_mediator_calls_total{module,message,outcome} and the histogram
    switchboard_mediator_seconds{module,message}. Those take a lock on each update (3 µs a call
    for both); CallStats are plain numbers, updated on the event loop's thread and read here when
    /metrics is scraped."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], CallStats] = {}

    def of(self, module: str, message: str) -> CallStats:
        """The one CallStats of this pair, shared by every Mediator in the process."""
        return self.stats.setdefault((module, message), CallStats())

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "switchboard_mediator_calls", "Mediator calls", labels=("module", "message", "outcome")
        )
        latency = HistogramMetricFamily(
            "switchboard_mediator_seconds", "Mediator call duration", labels=("module", "message")
        )
        latency_created = GaugeMetricFamily(  # what Histogram exports beside it
            "switchboard_mediator_seconds_created", "Mediator call duration", labels=("module", "message")
        )
        for (module, message), stats in list(self.stats.items()):
            for outcome, count in stats.outcomes.items():
                calls.add_metric((module, message, outcome), count, created=stats.created)
            cumulative = zip(_BUCKET_NAMES, accumulate(stats.buckets), strict=True)
            latency.add_metric((module, message), list(cumulative), stats.sum)
            latency_created.add_metric((module, message), stats.created)
        yield calls
        yield latency
        yield latency_created


METRICS = MediatorMetrics()
REGISTRY.register(METRICS)


class Bulkhead:
    """At most `limit` calls in flight for one module; beyond that, fail fast (503) instead of
    queueing without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0


class Route:
    """Everything a call of one message type needs, looked up once at start-up."""

    __slots__ = ("module", "handler", "timeout", "breaker", "watch", "bulkhead", "stats")

    def __init__(self, module: str, handler, timeout, breaker, watch, bulkhead, message: str) -> None:
        self.module = module
        self.handler = handler
        self.timeout = timeout
        self.breaker = breaker
        self.watch = watch
        self.bulkhead = bulkhead
        self.stats = METRICS.of(module, message)


class _BreakerWatch(aiobreaker.CircuitBreakerListener):
    """Follows one breaker's state changes, which aiobreaker reports to its listeners.

    `state` is the breaker's state object, what `breaker.state` returns after a chain of property
    lookups (0.7 µs, on every call); `closed` says whether it is CLOSED.

    `at` is when the breaker last opened, on the monotonic clock. aiobreaker stamps `opened_at` with
    utcnow() but measures `CircuitBreakerError.time_remaining` against local now(), so its answer
    is off by the zone's UTC offset (5 hours in New York, none at all in Tokyo)."""

    def __init__(self, breaker: aiobreaker.CircuitBreaker) -> None:
        self.at = 0.0
        self.state = breaker.state  # its first state is set without telling the listeners
        self.closed = self.state.state is aiobreaker.CircuitBreakerState.CLOSED

    def state_change(self, breaker, old, new) -> None:
        self.state = new
        self.closed = new.state is aiobreaker.CircuitBreakerState.CLOSED
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


class _Call:
    """One mediator call in flight: its deadline and the task running it."""

    __slots__ = ("deadline", "task", "cancelling", "cancel_requested")

    def __init__(self, deadline: float, task: asyncio.Task) -> None:
        self.deadline = deadline
        self.task = task
        self.cancelling = task.cancelling()  # cancel requests already pending when the call began
        self.cancel_requested = False  # by the sweeper, until the call withdraws it (Task.uncancel)


class _Deadlines:
    """Cancels the calls on one event loop that outlive their deadline. A timer per call
    (`asyncio.timeout`) is scheduled and cancelled on every call, ~7 µs on uvloop; here a call
    only joins a set, and one sweeper task, alive while calls are in flight, wakes every
    DEADLINE_RESOLUTION and cancels the tasks whose deadline has passed: never early, at most
    that late. The call turns the cancellation into its timeout error as `asyncio.timeout` does."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: set[_Call] = set()
        self.sweeper: asyncio.Task | None = None

    def watch(self, deadline: float) -> _Call:
        call = _Call(deadline, asyncio.current_task(self.loop))  # type: ignore[arg-type]  # always in a task
        self.calls.add(call)
        if self.sweeper is None:
            self.sweeper = self.loop.create_task(self._sweep(), name="mediator-deadlines")
        return call

    async def _sweep(self) -> None:
        try:
            while self.calls:
                await asyncio.sleep(DEADLINE_RESOLUTION)
                now = self.loop.time()
                due = sorted(
                    (call for call in self.calls if call.deadline <= now and not call.cancel_requested),
                    key=attrgetter("deadline"),
                )
                cancelled: set[asyncio.Task] = set()
                for call in due:
                    # Nested calls in one task: cancel only the innermost (earliest deadline), so
                    # the timeout is its own module's; the caller's turn comes at a later sweep.
                    if call.task not in cancelled:
                        cancelled.add(call.task)
                        call.cancel_requested = True
                        call.task.cancel()
        finally:
            self.sweeper = None


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
        self.conflict_retries = conflict_retries
        self.in_flight = 0  # commands and queries running now, every module: the relay yields to them
        self._routes: dict[type, Route] = {}
        self._deadlines: _Deadlines | None = None  # the calls in flight on the running loop
        watches: dict[str, _BreakerWatch] = {}
        for message_type, (module, handler) in handlers.items():
            if module not in self.breakers:
                breaker = self.breakers[module] = aiobreaker.CircuitBreaker(
                    fail_max=breaker_fail_max,
                    timeout_duration=timedelta(seconds=breaker_reset_seconds),
                    exclude=[_business_error(module)],
                    name=module,
                )
                watches[module] = _BreakerWatch(breaker)
                breaker.add_listener(watches[module])
                self.bulkheads[module] = Bulkhead(bulkhead_limit)
            timeout = getattr(message_type, "timeout", None) or default_timeout
            self._routes[message_type] = Route(
                module,
                handler,
                timeout,
                self.breakers[module],
                watches[module],
                self.bulkheads[module],
                message_type.__name__,
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
        stats = route.stats
        bulkhead = route.bulkhead
        if bulkhead.in_flight >= bulkhead.limit:
            stats.outcomes["unavailable"] += 1
            raise _unavailable(route.module, f"module {route.module!r} is at its concurrency limit", 1)
        bulkhead.in_flight += 1
        self.in_flight += 1
        started = time.perf_counter()
        outcome = "error"
        try:
            # The state call_async would act on: captured before the call, judged after it.
            state = route.watch.state
            if not route.watch.closed:
                # open: fail fast, or let the trial call through once the reset time is up
                result = await route.breaker.call_async(self._run, route, message)
            else:
                # Closed: run the handler directly, and go through aiobreaker only where call_async
                # would change something. A failure: it counts it unless excluded, and may open
                # the breaker. A success after failures: it resets the count. (Otherwise a success
                # only notifies the listeners, and _BreakerWatch listens to state changes alone.)
                try:
                    result = await self._run(route, message)
                except Exception as error:
                    state.call(_raise, error)  # raises it again, or CircuitBreakerError as it opens
                if route.breaker.fail_counter:
                    state.call(_return, result)
            outcome = "ok"
            return result
        except aiobreaker.CircuitBreakerError as error:
            outcome = "unavailable"
            retry_after = route.watch.retry_after(route.breaker)
            raise _unavailable(route.module, f"module {route.module!r} is failing; circuit open", retry_after) from error
        except Unavailable:
            outcome = "unavailable"
            raise
        except SwitchboardError:
            outcome = "rejected"
            raise
        finally:
            bulkhead.in_flight -= 1
            self.in_flight -= 1
            stats.record(outcome, time.perf_counter() - started)

    async def _run(self, route: Route, message: Any) -> Any:
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + route.timeout
        outer = _deadline.get()
        if outer is not None:
            # A nested call ends before its caller's deadline, so a hung dependency times out as
            # *its* failure (its breaker counts it; the caller sees its Unavailable), not the caller's.
            deadline = min(deadline, outer - DEADLINE_MARGIN)
        token = _deadline.set(deadline)
        deadlines = self._deadlines
        if deadlines is None or deadlines.loop is not loop:
            deadlines = self._deadlines = _Deadlines(loop)
        call = deadlines.watch(deadline)
        try:
            for attempt in range(self.conflict_retries + 1):
                try:
                    result = await route.handler(message)
                    break
                except ConcurrencyError:
                    if attempt == self.conflict_retries:
                        raise
                    # someone appended to the same stream first: reload and decide again
                    await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        except asyncio.CancelledError:
            # The sweeper's cancellation becomes the timeout error, unless the task was also
            # cancelled from outside (a disconnected client, shutdown): that one propagates.
            if call.cancel_requested:
                call.cancel_requested = False  # its cancel request is withdrawn here, not again below
                if call.task.uncancel() <= call.cancelling:
                    raise _unavailable(
                        route.module, f"{type(message).__name__} exceeded its {deadline - now:.3g}s deadline", 1
                    ) from None
            raise
        finally:
            _deadline.reset(token)
            deadlines.calls.discard(call)
            if call.cancel_requested:  # the handler swallowed the cancellation: withdraw the request anyway
                call.task.uncancel()
        return result


def _raise(error: BaseException) -> NoReturn:
    raise error


def _return(result: Any) -> Any:
    return result


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
