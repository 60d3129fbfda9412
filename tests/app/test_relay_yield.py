"""The relay yields to the synchronous path: while a command or query is in flight in its process,
it delivers one group at a time -- for rows younger than `relay_yield_seconds` -- and otherwise
its groups run side by side. What must hold: a busy mediator serialises the groups, an idle one
does not, groups that queued during a burst go side by side once it is over, and rows older
than the budget are never held back by the load."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest

from app.bootstrap import bootstrap
from app.messages import Command
from app.relay import Relay
from app.uow import UnitOfWork
from app.wiring import Envelope, Module, Subscription
from tests.app.relay_worker import TestEvent, append

SUBSCRIBERS = 4  # one event, four subscribers: four delivery groups in one batch
JOIN_SECONDS = 0.3  # how long a handler waits for a second group to be in its handler too


class Hold(Command):
    """A synchronous call that stays in flight until the test lets it go."""


@pytest.fixture
async def relay_and_call(db, settings):
    """A relay over four subscribers whose handlers measure how many groups run at once, and a
    way to keep one command in flight through the same system's mediator."""
    running = {"now": 0, "most": 0, "started": asyncio.Event()}
    joined = asyncio.Condition()

    async def handler(event: TestEvent, uow: UnitOfWork, envelope: Envelope) -> None:
        async with joined:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
            running["started"].set()
            joined.notify_all()
            # wait for another group to join; under yielding none can, and this times out
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(JOIN_SECONDS):
                    await joined.wait_for(lambda: running["now"] >= 2)
            running["now"] -= 1

    entered, release = asyncio.Event(), asyncio.Event()

    async def hold(cmd: Hold) -> None:
        entered.set()
        await release.wait()

    def build(yield_seconds: float) -> Relay:
        subscriptions = [Subscription(f"testing.yield_{n}", handler) for n in range(SUBSCRIBERS)]
        module = Module(name="testing", commands={Hold: hold}, subscriptions={TestEvent: subscriptions})
        system = bootstrap(
            replace(settings, modules=None, relay_yield_seconds=yield_seconds), db, modules=[module]
        )
        return Relay(system, instance_id="relay-test", concurrency=SUBSCRIBERS)

    @contextlib.asynccontextmanager
    async def call_in_flight(relay: Relay):
        call = asyncio.create_task(relay.system.mediator.send(Hold()))
        async with asyncio.timeout(5):
            await entered.wait()
        assert relay.system.mediator.in_flight == 1
        try:
            yield
        finally:
            release.set()
            await call
        assert relay.system.mediator.in_flight == 0

    yield build, call_in_flight, running


async def test_groups_run_one_at_a_time_while_a_call_is_in_flight(relay_and_call):
    build, call_in_flight, running = relay_and_call
    relay = build(yield_seconds=30.0)
    await append(relay.system, 1, 1)

    async with call_in_flight(relay):
        assert await relay.drain() == SUBSCRIBERS

    assert running["most"] == 1


async def test_groups_run_side_by_side_when_no_call_is_in_flight(relay_and_call):
    build, _, running = relay_and_call
    relay = build(yield_seconds=30.0)
    await append(relay.system, 1, 1)

    assert await relay.drain() == SUBSCRIBERS

    assert running["most"] >= 2


async def test_rows_older_than_the_budget_go_at_full_speed_whatever_the_load(relay_and_call):
    build, call_in_flight, running = relay_and_call
    relay = build(yield_seconds=0.0)  # every row is at least 0 s old: none yields
    await append(relay.system, 1, 1)

    async with call_in_flight(relay):
        assert await relay.drain() == SUBSCRIBERS

    assert running["most"] >= 2


async def test_groups_that_queued_during_a_burst_go_side_by_side_once_it_is_over(relay_and_call):
    build, call_in_flight, running = relay_and_call
    relay = build(yield_seconds=30.0)
    await append(relay.system, 1, 1)

    async with call_in_flight(relay):
        drained = asyncio.create_task(relay.drain())
        async with asyncio.timeout(5):
            await running["started"].wait()  # one group has the turn; the other three queue
        assert running["now"] == 1
    # The call is over while the first group still waits for company: when its turn ends, the
    # three that queued behind it run together, not one at a time.
    assert await drained == SUBSCRIBERS
    assert running["most"] >= 2
