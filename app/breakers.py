"""What a module's circuit breaker counts, and a cheap view of its state for the mediator's hot path."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import aiobreaker

from app.messages import CommandRejected, ConcurrencyError, DatabaseUnavailable, NotFound, Unavailable


class BreakerWatch(aiobreaker.CircuitBreakerListener):
    """Follows one breaker's state changes, which aiobreaker reports to its listeners.

    `state` is the breaker's state object, what `breaker.state` returns after a chain of property
    lookups that would otherwise run on every call; `closed` says whether it is CLOSED.

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

    def remaining(self, breaker: aiobreaker.CircuitBreaker) -> float:
        return breaker.timeout_duration.total_seconds() - (time.monotonic() - self.at)

    def retry_after(self, breaker: aiobreaker.CircuitBreaker) -> int:
        return max(1, math.ceil(self.remaining(breaker)))


def business_error(module: str) -> Callable[[BaseException], bool]:
    """Errors that say nothing about the target module's health do not count against its breaker:
    business rejections, the database's unavailability (every module shares it, and it is back
    when it is back, not a reset time later), and a dependency's unavailability reported by
    another module."""

    def excluded(error: BaseException) -> bool:
        if isinstance(error, (CommandRejected, NotFound, ConcurrencyError, DatabaseUnavailable)):
            return True
        return isinstance(error, Unavailable) and error.module is not None and error.module != module

    return excluded
