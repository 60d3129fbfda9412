"""What the chaos test found in the consumer, one fault at a time: an acknowledgement lost with
the node that should have answered it, a consumer that dies mid-delivery, a handler slower than
JetStream's ack wait."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import nats.errors
import pytest

from app.bootstrap import System, bootstrap
from app.broker.consumer import Consumer, durable_name
from app.broker.publisher import Publisher
from app.broker.stream import STREAM
from app.db import Database
from app.settings import Settings
from tests.broker.test_flow import PARTITIONS, SUBSCRIBER, acknowledged_everything, js, record_on_a, start  # noqa: F401
from tests.scale.conftest import wait_for

LEASE = 1.0  # SWITCHBOARD_RELAY_LEASE on B: the consumers' ack wait
SOON = 5.0  # well under the handler timeout's multiples the old ack wait was made of


@pytest.fixture
def system_b(settings: Settings, database_url_b: str, clean_b: Database) -> System:
    settings_b = replace(settings, database_url=database_url_b, modules=("payments", "notifications"),
                         instance_id="b", relay_lease_seconds=LEASE)  # fmt: skip
    return bootstrap(settings_b, clean_b)


@pytest.fixture
async def consumers(js, system_b) -> AsyncIterator[list[Consumer]]:  # noqa: F811 (js: fixture)
    started: list[Consumer] = []
    yield started
    for consumer in started:
        await consumer.stop()


class LostAck:
    """A message whose first acknowledgements get no answer (the node that carried them died)."""

    def __init__(self, msg, failures: int) -> None:
        self._msg, self.failures = msg, failures

    def __getattr__(self, name):
        return getattr(self._msg, name)

    async def ack_sync(self, timeout: float = 1.0):
        if self.failures:
            self.failures -= 1
            raise nats.errors.NoRespondersError
        return await self._msg.ack_sync(timeout=timeout)


class LosingAcks(Consumer):
    handled = 0

    async def handle(self, messages) -> None:
        self.handled += len(messages)
        await super().handle([LostAck(msg, failures=2) for msg in messages])


async def test_an_acknowledgement_without_an_answer_is_sent_again_instead_of_waiting_for_a_redelivery(
    system, db, js, system_b, consumers  # noqa: F811 (js: fixture)
):
    await record_on_a(db, uuid.uuid4(), 1)
    await Publisher(system, js, partitions=PARTITIONS).drain()
    consumer = await start(consumers, LosingAcks(system_b, js, SUBSCRIBER, partitions=PARTITIONS, ack_wait=60.0))

    await wait_for(lambda: acknowledged_everything(js), SOON, "the message acknowledged (ack wait: 60 s)")
    assert consumer.handled == 1
    assert await system_b.db.fetchval("SELECT count(*) FROM notifications_sent") == 1


class Dying(Consumer):
    """Takes the first batch and dies with it: no outcome, no acknowledgement, no progress, and
    its database session (the partitions' locks) gone as a dead process's is."""

    async def handle(self, messages) -> None:
        self.took = messages[0].metadata.sequence.stream
        for task in self._tasks:
            task.cancel()
        await self._locks.conn.close()
        await asyncio.Event().wait()


async def test_a_message_whose_consumer_died_goes_to_another_after_the_lease(system, db, js, system_b, consumers):  # noqa: F811
    await record_on_a(db, uuid.uuid4(), 1)
    await Publisher(system, js, partitions=PARTITIONS).drain()
    dying = await start(consumers, Dying(system_b, js, SUBSCRIBER, partitions=PARTITIONS))
    await wait_for(lambda: _value(getattr(dying, "took", None)), SOON, "the dying consumer took the message")

    await start(consumers, Consumer(system_b, js, SUBSCRIBER, partitions=PARTITIONS, instance_id="b2"))

    await wait_for(lambda: acknowledged_everything(js), SOON, f"the message redelivered after the lease ({LEASE:g} s)")
    assert await system_b.db.fetchval("SELECT count(*) FROM notifications_sent") == 1
    infos = [await js.consumer_info(STREAM, durable_name(SUBSCRIBER, p)) for p in range(PARTITIONS)]
    assert {i.config.ack_wait for i in infos} == {LEASE}


class Slow(Consumer):
    handled = 0

    async def handle(self, messages) -> None:
        self.handled += len(messages)
        await super().handle(messages)


async def test_a_handler_slower_than_the_lease_keeps_its_message_and_runs_once(system, db, js, system_b, consumers):  # noqa: F811
    await record_on_a(db, uuid.uuid4(), 1)
    await Publisher(system, js, partitions=PARTITIONS).drain()
    slow = Slow(system_b, js, SUBSCRIBER, partitions=PARTITIONS, ack_wait=LEASE)
    real, calls = slow.bound.handler, []

    async def takes_three_leases(*args, **kwargs):
        calls.append(1)
        await asyncio.sleep(3 * LEASE)  # the slow handler under test, not a synchronisation
        await real(*args, **kwargs)

    slow.bound = replace(slow.bound, handler=takes_three_leases)
    other = Slow(system_b, js, SUBSCRIBER, partitions=PARTITIONS, instance_id="b2", ack_wait=LEASE)
    other.bound = slow.bound
    await start(consumers, slow)
    await start(consumers, other)

    await wait_for(lambda: acknowledged_everything(js), 6 * LEASE + SOON, "the slow message acknowledged")
    assert (slow.handled + other.handled, len(calls)) == (1, 1)
    infos = [await js.consumer_info(STREAM, durable_name(SUBSCRIBER, p)) for p in range(PARTITIONS)]
    assert sum(i.num_redelivered for i in infos) == 0
    assert await system_b.db.fetchval("SELECT count(*) FROM notifications_sent") == 1


async def _value(value):
    return value
