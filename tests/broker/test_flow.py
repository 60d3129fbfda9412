"""Events from database A to a subscriber on database B through a 3-node JetStream cluster:
published once A's outbox row is acknowledged by JetStream, applied once on B (a taken-row in B's
inbox), in key order; a failing message is handed to B's outbox, whose relay retries it and parks
it in B's own dead letters when the handler keeps failing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import msgspec
import nats
import pytest

from app.bootstrap import System, bootstrap
from app.broker.apply import taken_name
from app.broker.consumer import Consumer, durable_name
from app.broker.publisher import PUBLISHER, Publisher
from app.broker.stream import STREAM, cluster_size, ensure_stream, partition_of
from app.db import Database
from app.relay import Relay
from app.relay import dead_letters as letters
from app.settings import Settings
from modules.payments.events import PaymentCaptured
from tests.scale.conftest import wait_for

SUBSCRIBER = "notifications.notify_customer"
PARTITIONS = 2
WAIT = 20.0

OUTBOX_ROW_SQL = """
INSERT INTO outbox (message_id, position, subscriber, type, partition_key, payload, headers)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb)
"""


async def record_on_a(db: Database, order_id: uuid.UUID, position: int, correlation: str = "corr-1") -> uuid.UUID:
    """The outbox row A's commit writes for an event whose subscriber lives on B."""
    event = PaymentCaptured(order_id=order_id, payment_method="card", provider_reference=f"ref-{position}")
    message_id = uuid.uuid4()
    headers = {"correlation_id": correlation, "causation_id": str(uuid.uuid4())}
    await db.execute(
        OUTBOX_ROW_SQL, message_id, position, PUBLISHER, event.topic(), f"payment-{order_id}",
        msgspec.json.encode(event).decode(), msgspec.json.encode(headers).decode(),
    )  # fmt: skip
    return message_id


@pytest.fixture
async def js(nats_cluster) -> AsyncIterator:
    nc = await nats.connect(nats_cluster.urls)
    js = nc.jetstream()
    await ensure_stream(js, replicas=cluster_size(nc))
    yield js
    await nc.close()


@pytest.fixture
def system_b(settings: Settings, database_url_b: str, clean_b: Database) -> System:
    settings_b = replace(settings, database_url=database_url_b, modules=("payments", "notifications"),
                         instance_id="b", retry_max_attempts=3)  # fmt: skip
    return bootstrap(settings_b, clean_b)


@pytest.fixture
async def consumers(js, system_b) -> AsyncIterator[list[Consumer]]:
    """Consumers started by a test; all stopped at teardown."""
    started: list[Consumer] = []
    yield started
    for consumer in started:
        await consumer.stop()


async def start(consumers: list[Consumer], consumer: Consumer) -> Consumer:
    await consumer.ensure()
    consumer.start()
    consumers.append(consumer)
    return consumer


async def acknowledged_everything(js) -> bool:
    for p in range(PARTITIONS):
        info = await js.consumer_info(STREAM, durable_name(SUBSCRIBER, p))
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def test_events_published_on_a_are_applied_once_on_b(system, db, js, system_b, consumers):
    orders = [uuid.uuid4() for _ in range(3)]
    ids = [await record_on_a(db, order, position) for position, order in enumerate(orders, 1)]

    assert await Publisher(system, js, partitions=PARTITIONS).drain() == 3
    await start(consumers, Consumer(system_b, js, SUBSCRIBER, partitions=PARTITIONS))
    await wait_for(lambda: system_b.db.fetchval("SELECT count(*) = 3 FROM notifications_sent"), WAIT, "3 notifications")
    await wait_for(lambda: acknowledged_everything(js), WAIT, "every message acknowledged")

    sent = await system_b.db.fetch("SELECT order_id, kind, message_id FROM notifications_sent ORDER BY order_id")
    assert sorted((r["order_id"], r["message_id"]) for r in sent) == sorted(zip(orders, ids, strict=True))
    assert {r["kind"] for r in sent} == {"payment_captured"}
    inbox = await system_b.db.fetch("SELECT subscriber, message_id FROM inbox")
    assert sorted(r["message_id"] for r in inbox) == sorted(ids) and {r["subscriber"] for r in inbox} == {taken_name(SUBSCRIBER)}
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0
    assert await db.fetchval("SELECT count(*) FROM notifications_sent") == 0  # A holds no notifications
    assert await system_b.db.fetchval("SELECT count(*) FROM outbox") == 0


async def test_the_message_carries_the_event_id_key_and_correlation_in_its_headers(system, db, js):
    order = uuid.uuid4()
    message_id = await record_on_a(db, order, 7, correlation="corr-xyz")

    await Publisher(system, js, partitions=PARTITIONS).drain()

    stored = await js.get_msg(STREAM, 1)
    assert stored.subject == f"switchboard.events.{partition_of(f'payment-{order}', PARTITIONS)}.payments.PaymentCaptured"
    assert stored.headers["Nats-Msg-Id"] == str(message_id)
    assert stored.headers["Switchboard-Correlation-Id"] == "corr-xyz"
    assert stored.headers["Switchboard-Partition-Key"] == f"payment-{order}"
    assert stored.headers["Switchboard-Position"] == "7"
    assert "Switchboard-Causation-Id" in stored.headers


class CrashBeforeOutboxAck(Publisher):
    """Dies after JetStream acknowledged the publish, before the outbox row is acknowledged."""

    def acknowledge(self, conn, ids):
        raise ConnectionError("process died")


async def test_a_publish_repeated_after_a_crash_is_stored_and_applied_once(system, db, js, system_b, consumers):
    await record_on_a(db, uuid.uuid4(), 1)
    with pytest.raises(ConnectionError):
        await CrashBeforeOutboxAck(system, js, partitions=PARTITIONS).run_once()
    assert await db.fetchval("SELECT status FROM outbox") == "pending"  # handed back

    assert await Publisher(system, js, partitions=PARTITIONS).drain() == 1  # published again

    assert (await js.stream_info(STREAM)).state.messages == 1  # JetStream dropped the duplicate
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0  # acknowledged: deleted (outbox retention 0, the default)
    await start(consumers, Consumer(system_b, js, SUBSCRIBER, partitions=PARTITIONS))
    await wait_for(lambda: acknowledged_everything(js), WAIT, "every message acknowledged")
    assert await system_b.db.fetchval("SELECT count(*) FROM notifications_sent") == 1


class CrashBeforeAck(Consumer):
    """Commits, then dies before acknowledging to JetStream."""

    async def ack(self, msg) -> None:
        self.crashed = getattr(self, "crashed", 0) + 1


class Counting(Consumer):
    handled = 0

    async def handle(self, messages) -> None:
        self.handled += len(messages)
        await super().handle(messages)


async def test_a_redelivery_after_a_crash_before_the_ack_is_settled_by_the_inbox(system, db, js, system_b, consumers):
    await record_on_a(db, uuid.uuid4(), 1)
    await Publisher(system, js, partitions=PARTITIONS).drain()
    crashing = await start(consumers, CrashBeforeAck(system_b, js, SUBSCRIBER, partitions=PARTITIONS, ack_wait=1.0))

    async def crashed() -> int:
        return getattr(crashing, "crashed", 0)

    await wait_for(crashed, WAIT, "the crash before the ack")
    await crashing.stop()
    assert await system_b.db.fetchval("SELECT count(*) FROM notifications_sent") == 1

    after = await start(consumers, Counting(system_b, js, SUBSCRIBER, partitions=PARTITIONS, ack_wait=1.0))
    await wait_for(lambda: acknowledged_everything(js), WAIT, "the redelivery acknowledged")

    assert after.handled == 1 and after.applied == 0  # redelivered, and the taken-row skipped the handler
    assert await system_b.db.fetchval("SELECT count(*) FROM notifications_sent") == 1


async def test_a_handler_that_keeps_failing_ends_in_b_dead_letters_and_replays_there(system, db, js, system_b, consumers):
    message_id = await record_on_a(db, uuid.uuid4(), 1)
    await Publisher(system, js, partitions=PARTITIONS).drain()
    failing = Consumer(system_b, js, SUBSCRIBER, partitions=PARTITIONS)
    real_handler = failing.bound.handler

    async def broken(event, uow, envelope):
        raise RuntimeError("mail server down")

    failing.bound = replace(failing.bound, handler=broken)
    system_b.subscriptions[SUBSCRIBER] = failing.bound  # B's relay runs the same broken handler
    await start(consumers, failing)
    await wait_for(lambda: acknowledged_everything(js), WAIT, "the message handed over and acknowledged")
    assert await system_b.db.fetchval("SELECT attempts FROM outbox WHERE message_id = $1", message_id) == 1

    relay_b = Relay(system_b, instance_id="relay-b")
    await wait_for(lambda: _drained_to_dead(relay_b, system_b), WAIT, "B's relay retried it to a dead letter")
    parked = await letters.list_dead_letters(system_b.db)
    assert [(p["subscriber"], p["message_id"], p["attempts"], p["error_type"]) for p in parked] == [
        (SUBSCRIBER, message_id, 3, "RuntimeError")
    ]
    assert await system_b.db.fetchval("SELECT count(*) FROM notifications_sent") == 0
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0  # A's side published fine
    # B's operator replays it; B's own relay delivers it with the real handler
    system_b.subscriptions[SUBSCRIBER] = replace(failing.bound, handler=real_handler)
    assert await letters.replay(system_b.db, [parked[0]["id"]], "operator") == [parked[0]["id"]]
    await Relay(system_b, instance_id="relay-b").drain()
    assert await system_b.db.fetchval("SELECT count(*) FROM notifications_sent") == 1


async def _drained_to_dead(relay: Relay, system_b: System) -> bool:
    """One relay pass with the retry pauses skipped (they are the policy's, not the test's)."""
    await system_b.db.execute("UPDATE outbox SET available_at = now() WHERE status = 'pending'")
    await relay.drain()
    return await system_b.db.fetchval("SELECT count(*) FROM dead_letters") == 1


async def test_a_retried_message_keeps_its_key_ahead_of_the_next_one(system, db, js, system_b, consumers):
    order = uuid.uuid4()
    first = await record_on_a(db, order, 1)
    await Publisher(system, js, partitions=PARTITIONS).drain()
    second = await record_on_a(db, order, 2)  # same key: held back until the first is delivered
    await Publisher(system, js, partitions=PARTITIONS).drain()
    consumer = Consumer(system_b, js, SUBSCRIBER, partitions=PARTITIONS)
    real, seen = consumer.bound.handler, []

    async def flaky(event, uow, envelope):
        seen.append(envelope.message_id)
        if seen.count(first) < 3:
            raise RuntimeError("not yet")
        await real(event, uow=uow, envelope=envelope)

    consumer.bound = replace(consumer.bound, handler=flaky)
    system_b.subscriptions[SUBSCRIBER] = consumer.bound  # B's relay retries it with the same handler
    await start(consumers, consumer)
    await wait_for(lambda: acknowledged_everything(js), WAIT, "both messages taken and acknowledged")
    queued = await system_b.db.fetch("SELECT message_id FROM outbox WHERE status = 'pending' ORDER BY id")
    assert [r["message_id"] for r in queued] == [first, second]  # handed over, the second behind it

    relay_b = Relay(system_b, instance_id="relay-b")

    async def both_sent() -> bool:
        await system_b.db.execute("UPDATE outbox SET available_at = now() WHERE status = 'pending'")
        await relay_b.drain()
        return await system_b.db.fetchval("SELECT count(*) = 2 FROM notifications_sent")

    await wait_for(both_sent, WAIT, "B's relay retried the first, then the second")
    assert seen == [first, first, first, second]
    sent = await system_b.db.fetch("SELECT message_id FROM notifications_sent ORDER BY id")
    assert [r["message_id"] for r in sent] == [first, second]


async def test_a_publish_jetstream_does_not_acknowledge_is_retried_with_its_error(system, db, js):
    await record_on_a(db, uuid.uuid4(), 1)

    assert await Publisher(system, js, partitions=PARTITIONS, stream="NO_SUCH_STREAM", publish_timeout=1.0).run_once() == 1

    row = await db.fetchrow("SELECT status, attempts, locked_by, last_error FROM outbox")
    assert (row["status"], row["attempts"], row["locked_by"]) == ("pending", 1, None)
    assert row["last_error"].startswith("APIError") or "stream" in row["last_error"].lower()
    assert (await js.stream_info(STREAM)).state.messages == 0


async def test_a_consumer_is_only_for_a_subscription_hosted_here(system_b, js):
    with pytest.raises(ValueError, match="no subscription named 'orders.project_order_view' is hosted here"):
        Consumer(system_b, js, "orders.project_order_view")


async def test_a_parked_key_holds_later_messages_back_until_its_letter_is_replayed(system, db, js, system_b, consumers):
    order = uuid.uuid4()
    first = await record_on_a(db, order, 1)
    await Publisher(system, js, partitions=PARTITIONS).drain()
    second = await record_on_a(db, order, 2)
    await Publisher(system, js, partitions=PARTITIONS).drain()
    consumer = Consumer(system_b, js, SUBSCRIBER, partitions=PARTITIONS)
    real = consumer.bound.handler

    async def fails_for_the_first(event, uow, envelope):
        if envelope.message_id == first:
            raise RuntimeError("mail server down")
        await real(event, uow=uow, envelope=envelope)

    consumer.bound = replace(consumer.bound, handler=fails_for_the_first)
    system_b.subscriptions[SUBSCRIBER] = consumer.bound
    await start(consumers, consumer)
    await wait_for(lambda: acknowledged_everything(js), WAIT, "both messages settled")
    relay_b = Relay(system_b, instance_id="relay-b")
    await wait_for(lambda: _drained_to_dead(relay_b, system_b), WAIT, "the first parked by B's relay")
    system_b.subscriptions[SUBSCRIBER] = replace(consumer.bound, handler=real)

    assert await system_b.db.fetchval("SELECT count(*) FROM notifications_sent") == 0  # the second waits
    waiting = await system_b.db.fetch("SELECT message_id, status FROM outbox ORDER BY id")
    assert [(r["message_id"], r["status"]) for r in waiting] == [(first, "dead"), (second, "blocked")]  # parked behind it
    (letter,) = await letters.parked_ids(system_b.db)
    await letters.replay(system_b.db, [letter], "operator")
    await Relay(system_b, instance_id="relay-b").drain()
    sent = await system_b.db.fetch("SELECT message_id FROM notifications_sent ORDER BY id")
    assert [r["message_id"] for r in sent] == [first, second]


async def test_running_publisher_and_consumer_carry_a_row_committed_after_they_started(system, db, js, system_b, consumers):
    publisher = Publisher(system, js, partitions=PARTITIONS)
    publisher.start()
    try:
        await start(consumers, Consumer(system_b, js, SUBSCRIBER, partitions=PARTITIONS))
        message_id = await record_on_a(db, uuid.uuid4(), 1)
        db.outbox_written()  # what A's commit does after writing outbox rows

        await wait_for(lambda: system_b.db.fetchval("SELECT message_id FROM notifications_sent"), WAIT, "the notification")
    finally:
        await publisher.stop()

    assert await system_b.db.fetchval("SELECT message_id FROM notifications_sent") == message_id
    assert publisher.published == 1
    assert await db.fetchval("SELECT count(*) FROM outbox") == 0  # acknowledged: deleted (outbox retention 0, the default)


async def test_a_broker_outage_spends_no_attempt_and_ends_in_a_publish_not_a_dead_letter(system, db, js, nats_cluster):
    message_id = await record_on_a(db, uuid.uuid4(), 1)
    publisher = Publisher(system, js, partitions=PARTITIONS, publish_timeout=0.5)
    for node in nats_cluster.nodes:
        node.kill()

    for _ in range(system.settings.retry_max_attempts + 2):  # more claims than any policy allows
        await db.execute("UPDATE outbox SET available_at = now()")  # the pause is the test's to skip
        assert await publisher.run_once() == 1
    row = await db.fetchrow("SELECT status, attempts, locked_by, last_error, available_at > now() AS paused FROM outbox")
    assert (row["status"], row["attempts"], row["locked_by"], row["paused"]) == ("pending", 0, None, True)
    assert row["last_error"].startswith("broker away: ")
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0

    for node in nats_cluster.nodes:
        node.restart()
    async with aiohttp.ClientSession() as session:
        for node in nats_cluster.nodes:
            await node.wait_current(session)
    await db.execute("UPDATE outbox SET available_at = now()")
    async def published() -> bool:
        await publisher.run_once()
        return await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0

    await wait_for(published, WAIT, "the row published once the cluster is back")
    assert (await js.get_msg(STREAM, 1)).headers["Nats-Msg-Id"] == str(message_id)
