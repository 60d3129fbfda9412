"""Delivery groups yield to the synchronous path: while commands or queries are in flight, groups
of young rows are delivered one at a time."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import Counter

from app.relay.claims import Batch

YIELDED = Counter(
    "switchboard_relay_yielded_groups_total",
    "Delivery groups run one at a time because commands or queries were in flight",
)


class YieldGate:
    def __init__(self, system, yield_seconds: float) -> None:
        self.system = system
        self.yield_seconds = yield_seconds
        self._turns = asyncio.Condition()  # groups that yield to the synchronous path take turns
        self._yielder_running = False

    def yields(self, batch: Batch, oldest) -> bool:
        """Whether a group yields to the synchronous path: commands or queries are in flight in
        this process, and the group's oldest row is younger than `relay_yield_seconds` (the async
        side's lag budget under load). Yielding groups are delivered one at a time, so a burst of
        requests keeps the CPU and the outbox absorbs the async work; a backlog older than the
        budget is delivered at full speed, whatever the load, and then the requests share."""
        mediator = getattr(self.system, "mediator", None)
        return mediator is not None and mediator.in_flight > 0 and batch.age(oldest) < self.yield_seconds

    @contextlib.asynccontextmanager
    async def turn(self, batch: Batch, oldest):
        """Around a group's delivery: while it yields, wait until no other yielding group is being
        delivered, and hand the turn on when done. Waiters look again each time a turn ends, so
        a group goes at full speed as soon as the requests are gone or its rows outgrow the
        budget -- a backlog queued during a burst is not delivered one group at a time after it."""
        async with self._turns:
            while self.yields(batch, oldest) and self._yielder_running:
                await self._turns.wait()
            mine = self.yields(batch, oldest)
            if mine:
                self._yielder_running = True
                YIELDED.inc()
        try:
            yield
        finally:
            if mine:
                async with self._turns:
                    self._yielder_running = False
                    self._turns.notify_all()
