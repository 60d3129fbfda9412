"""The mediator: one handler per command/query type, registered by the owning module, called
through behaviours — bulkhead, circuit breaker, deadline, conflict retry, metrics.

Every call pays for all of them, so each is kept cheap on the path a healthy call takes
(bench/mediator_cost.py measures it): deadlines are enforced by one sweeper task instead of a timer
per call, aiobreaker runs only when a call fails or the breaker is not closed, and the metrics are
plain numbers read at scrape time."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any, NoReturn

import aiobreaker

from app import context, observe
from app.breakers import BreakerWatch, business_error
from app.conflicts import BACKOFF_STEP, retry_on_conflict
from app.db import CONNECTION_ERRORS
from app.deadlines import DEADLINE, DEADLINE_MARGIN, Deadlines, deadline_in
from app.messages import (
    Command,
    ConcurrencyError,
    DatabaseUnavailable,
    Query,
    SwitchboardError,
    Unavailable,
)
from app.metrics import METRICS
from app.wiring import StaleFallback

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]


class Bulkhead:
    """At most `limit` calls in flight for one module; beyond that, fail fast (503) instead of
    queueing without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0


class Route:
    """Everything a call of one message type needs, looked up once at start-up."""

    __slots__ = (
        "module", "handler", "timeout", "breaker", "watch", "bulkhead", "stats", "fallback", "answers", "scope"
    )

    def __init__(self, module: str, handler, timeout, breaker, watch, bulkhead, message: str, fallback=None) -> None:
        self.module = module
        self.handler = handler
        self.timeout = timeout
        self.breaker = breaker
        self.watch = watch
        self.bulkhead = bulkhead
        self.stats = METRICS.of(module, message)
        self.fallback: StaleFallback | None = fallback
        self.answers: OrderedDict[Any, Any] = OrderedDict()  # the last good ones, if it has a fallback
        self.scope = (module, message)  # (module, message type): app/context.py's scope while it runs


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
        fallbacks: Mapping[type, StaleFallback] | None = None,
    ) -> None:
        self.local_modules = local_modules  # None: every module runs in this process
        self.breakers: dict[str, aiobreaker.CircuitBreaker] = {}
        self.bulkheads: dict[str, Bulkhead] = {}
        self.conflict_retries = conflict_retries
        self.in_flight = 0  # commands and queries running now, every module: the relay yields to them
        self._routes: dict[type, Route] = {}
        self._deadlines: Deadlines | None = None  # the calls in flight on the running loop
        fallbacks = dict(fallbacks or {})
        for message_type in fallbacks:
            if not issubclass(message_type, Query):  # a command's effect cannot be made up
                raise TypeError(f"{message_type.__name__} is not a Query: only queries may declare a fallback")
        watches: dict[str, BreakerWatch] = {}
        self._watches = watches
        for message_type, (module, handler) in handlers.items():
            if module not in self.breakers:
                breaker = self.breakers[module] = aiobreaker.CircuitBreaker(
                    fail_max=breaker_fail_max,
                    timeout_duration=timedelta(seconds=breaker_reset_seconds),
                    exclude=[business_error(module)],
                    name=module,
                )
                watches[module] = BreakerWatch(breaker)
                breaker.add_listener(watches[module])
                self.bulkheads[module] = Bulkhead(bulkhead_limit)
            timeout = getattr(message_type, "timeout", None) or default_timeout
            self._routes[message_type] = Route(
                module, handler, timeout, self.breakers[module], watches[module], self.bulkheads[module],
                message_type.__name__, fallbacks.get(message_type),
            )

    async def send(self, command: Command) -> Any:
        """Run a command in the module that owns it; returns what its handler returns."""
        return await self._dispatch(command)

    async def ask(self, query: Query) -> Any:
        """Run a query in the module that owns it. A query with a fallback is answered, while its
        module is unavailable, from the last answer this process got to an equal query."""
        route = self._routes.get(type(query))
        if route is None or route.fallback is None:
            return await self._dispatch(query)
        answers = route.answers
        try:
            result = await self._dispatch(query)
        except Unavailable:
            if query not in answers:  # never answered here: nothing to fall back on
                raise
            return route.fallback.mark(answers[query])
        answers[query] = result
        answers.move_to_end(query)
        if len(answers) > route.fallback.keep:
            answers.popitem(last=False)
        return result

    async def dispatch_local(self, message: Command | Query, budget: float | None = None) -> Any:
        """For the remote transport's receiving end: run only if the owning module is hosted
        here, so a misrouted call cannot bounce from process to process, and only if the caller
        still waits (`budget`: its seconds left; none left: refused without running)."""
        route = self._routes.get(type(message))
        if route is not None and self.local_modules is not None and route.module not in self.local_modules:
            raise Unavailable(f"module {route.module!r} is not hosted by this instance")
        if budget is None:
            return await self._dispatch(message)
        if budget <= 0:
            if route is not None:
                route.stats.record("unavailable", 0.0)
            raise Unavailable(f"{type(message).__name__} arrived {-budget:.3f}s after its caller's deadline; not run")
        with deadline_in(budget):
            return await self._dispatch(message)

    def route(self, message_type: type) -> Route:
        """How a message type is dispatched (its module, deadline, breaker): for `describe` and tests."""
        return self._routes[message_type]

    def open_breakers(self) -> dict[str, int]:
        """Modules whose breaker refuses calls now, and the seconds until it lets a trial call
        through. One past its reset time is not listed: its next call is the trial."""
        breakers = self.breakers
        return {m: w.retry_after(breakers[m]) for m, w in self._watches.items()
                if not w.closed and w.remaining(breakers[m]) > 0}

    async def _dispatch(self, message: Any) -> Any:
        route = self._routes.get(type(message))
        if route is None:
            raise LookupError(f"no handler registered for {type(message).__name__}")
        stats = route.stats
        bulkhead = route.bulkhead
        if bulkhead.in_flight >= bulkhead.limit:
            stats.outcomes["unavailable"] += 1
            raise Unavailable(f"module {route.module!r} is at its concurrency limit", module=route.module)
        bulkhead.in_flight += 1
        self.in_flight += 1
        started = time.perf_counter()
        outcome = "error"
        scope = context.scope.set(route.scope)  # what its log lines name; a span only when tracing
        span = observe.call_span(route.scope) if observe.TRACING else None
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
                # only notifies the listeners, and BreakerWatch listens to state changes alone.)
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
            detail = f"module {route.module!r} is failing; circuit open"
            raise Unavailable(detail, retry_after=retry_after, module=route.module) from error
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
            if span is not None or observe.DEBUG:
                observe.end_call(span, outcome, started)
            context.scope.reset(scope)

    async def _run(self, route: Route, message: Any) -> Any:
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + route.timeout
        outer = DEADLINE.get()
        if outer is not None:
            # A nested call ends before its caller's deadline, so a hung dependency times out as
            # *its* failure (its breaker counts it; the caller sees its Unavailable), not the caller's.
            deadline = min(deadline, outer - DEADLINE_MARGIN)
        token = DEADLINE.set(deadline)
        deadlines = self._deadlines
        if deadlines is None or deadlines.loop is not loop:
            deadlines = self._deadlines = Deadlines(loop)
        call = deadlines.watch(deadline)
        try:
            try:
                result = await route.handler(message)
            except ConcurrencyError:
                # Someone appended to the same stream first: reload and decide again, by the shared
                # rule. The first attempt runs outside it, so a call that meets no conflict (nearly
                # every one) does not pay for the helper's extra coroutine and loop.
                if not self.conflict_retries:
                    raise
                await asyncio.sleep(random.uniform(0, BACKOFF_STEP))
                result = await retry_on_conflict(route.handler, message, retries=self.conflict_retries - 1)
        except CONNECTION_ERRORS as error:
            log.warning("%s: the database cannot be reached: %r", type(message).__name__, error)
            raise DatabaseUnavailable(f"the database cannot be reached ({type(error).__name__})") from error
        except asyncio.CancelledError:
            # The sweeper's cancellation becomes the timeout error, unless the task was also
            # cancelled from outside (a disconnected client, shutdown): that one propagates.
            if call.cancel_requested:
                call.cancel_requested = False  # its cancel request is withdrawn here, not again below
                if call.task.uncancel() <= call.cancelling:
                    detail = f"{type(message).__name__} exceeded its {deadline - now:.3g}s deadline"
                    raise Unavailable(detail, module=route.module) from None
            raise
        finally:
            DEADLINE.reset(token)
            deadlines.calls.discard(call)
            if call.cancel_requested:  # the handler swallowed the cancellation: withdraw the request anyway
                call.task.uncancel()
        return result


def _raise(error: BaseException) -> NoReturn:
    raise error


def _return(result: Any) -> Any:
    return result
