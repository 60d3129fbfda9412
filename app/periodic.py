"""The shape of a module's housekeeping task: run a job every so often, forever, and survive its
failures (the next round retries; a task that died would let its table grow unseen)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


async def every(seconds: float, job: Callable[[], Awaitable[Any]], name: str) -> None:
    """`await job()` every `seconds` (the first after one interval) until cancelled; a failure is
    logged with its traceback under `name` and the loop goes on."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception:
            log.exception("%s failed; the next round retries", name)
