"""One rule for optimistic-concurrency losses, wherever they happen: decide again on fresh state."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from app.messages import ConcurrencyError

T = TypeVar("T")

BACKOFF_STEP = 0.002  # seconds: the n-th retry waits uniform(0, n x this), so racers spread out


def is_conflict(error: BaseException) -> bool:
    return isinstance(error, ConcurrencyError)


async def retry_on_conflict(
    attempt: Callable[..., Awaitable[T]],
    *args: Any,
    retries: int,
    conflict: Callable[[BaseException], bool] = is_conflict,
) -> T:
    """`await attempt(*args)`, again after a short jittered pause each time it raises an error
    `conflict` accepts (another writer appended to the same stream first), at most `retries` more
    times; then, or on any other error, the error propagates."""
    for n in range(retries + 1):
        try:
            return await attempt(*args)
        except Exception as error:
            if n == retries or not conflict(error):
                raise
        await asyncio.sleep(random.uniform(0, BACKOFF_STEP * (n + 1)))
    raise AssertionError("unreachable")  # the loop returns or raises
