"""One retry policy per subscription: how many attempts, and the backoff between them -- the
subscription's own values where it sets them, the settings' defaults where not, resolved here
and nowhere else."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.settings import Settings
from app.wiring import Subscription


class LeaseExpired(Exception):
    """Earlier attempts ended without an outcome (the relay holding the row died)."""


def backoff_delay(attempt: int, base: float, cap: float, rand=random.random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^(attempt-1)))."""
    return rand() * min(cap, base * 2 ** max(attempt - 1, 0))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A row is attempted at most max_attempts times: a failed last attempt dead-letters it, and
    a row claimed beyond it (its later attempts ended without an outcome: the relay holding it
    died) is not run again but dead-lettered as LeaseExpired."""

    max_attempts: int
    base_seconds: float
    cap_seconds: float

    def exhausted(self, attempts: int) -> bool:
        """A failed attempt was the last one allowed: the row goes to the dead letters."""
        return attempts >= self.max_attempts

    def delay(self, attempt: int, rand=random.random) -> float:
        return backoff_delay(attempt, self.base_seconds, self.cap_seconds, rand)


def retry_policy(subscription: Subscription | None, settings: Settings) -> RetryPolicy:
    """The subscription's overrides over the settings' defaults (None or 0: the default)."""
    sub = subscription
    return RetryPolicy(
        (sub and sub.max_attempts) or settings.retry_max_attempts,
        (sub and sub.retry_base_seconds) or settings.retry_base_seconds,
        (sub and sub.retry_cap_seconds) or settings.retry_cap_seconds,
    )


class RetryPolicies(dict[str, RetryPolicy]):
    """Each subscriber's policy by name, resolved on first use and kept: a delivery only looks it
    up (a plain dict lookup once resolved)."""

    def __init__(self, subscriptions: Mapping[str, Any], settings: Settings) -> None:
        super().__init__()
        self._subscriptions = subscriptions  # name -> bound subscription (.subscription), or absent
        self._settings = settings

    def __missing__(self, subscriber: str) -> RetryPolicy:
        bound = self._subscriptions.get(subscriber)
        policy = self[subscriber] = retry_policy(bound.subscription if bound else None, self._settings)
        return policy
