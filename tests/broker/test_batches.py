"""The consumer pulls a batch per partition and applies it in one transaction with one ack; a
handler failure is handed to B's outbox (its relay retries it, the key's later messages queue
behind it), a database failure gives the batch back to JetStream, which delivers it again, in
order, before anything new."""

from __future__ import annotations

import uuid
from dataclasses import replace

from app.broker.apply import taken_name
from app.broker.consumer import BATCH, Consumer, durable_name
from app.broker.publisher import Publisher
from app.broker.stream import STREAM, partition_of
from app.relay import Relay
from tests.broker.test_flow import (  # noqa: F401 (fixtures)
    PARTITIONS,
    SUBSCRIBER,
    WAIT,
    acknowledged_everything,
    consumers,
    js,
    record_on_a,
    start,
    system_b,
)  # fmt: skip
from tests.scale.conftest import wait_for


def orders_in_partition(partition: int, count: int) -> list[uuid.UUID]:
    found: list[uuid.UUID] = []
    while len(found) < count:
        order = uuid.uuid4()
        if partition_of(f"payment-{order}", PARTITIONS) == partition:
            found.append(order)
    return found


async def sent_by_order(db) -> dict[uuid.UUID, list[uuid.UUID]]:
    rows = await db.fetch("SELECT order_id, message_id FROM notifications_sent ORDER BY id")
    by_order: dict[uuid.UUID, list[uuid.UUID]] = {}
    for r in rows:
        by_order.setdefault(r["order_id"], []).append(r["message_id"])
    return by_order


class Counting(Consumer):
    batches: list[list[uuid.UUID]]
    acks = 0

    async def handle(self, messages) -> None:
        self.batches = getattr(self, "batches", [])
        self.batches.append([self.row_of(m)["message_id"] for m in messages])
        await super().handle(messages)

    async def ack(self, msg) -> None:
        self.acks += 1
        await super().ack(msg)


async def test_a_failing_message_mid_batch_is_handed_to_b_outbox_and_its_key_waits_behind_it(
    system, db, js, system_b, consumers  # noqa: F811
):
    keys = orders_in_partition(0, 3)
    ids: dict[uuid.UUID, list[uuid.UUID]] = {k: [] for k in keys}
    for position in range(1, 5):  # interleaved: k0 k1 k2 k0 k1 k2 ...
        for key in keys:
            ids[key].append(await record_on_a(db, key, position * 10 + keys.index(key)))
    await Publisher(system, js, partitions=PARTITIONS).drain()
    failing = ids[keys[1]][1]  # the second message of the middle key
    consumer = Counting(system_b, js, SUBSCRIBER, partitions=PARTITIONS)
    real, calls, mail_server = consumer.bound.handler, [], {"up": False}

    async def fails_once(items, uow, envelope):  # a batch subscription: the consumer passes one item
        for item in items:
            calls.append(item.envelope.message_id)
            if item.envelope.message_id == failing and not mail_server["up"]:
                raise RuntimeError("mail server down")
        await real(items, uow=uow, envelope=envelope)

    consumer.bound = replace(consumer.bound, handler=fails_once)
    system_b.subscriptions[SUBSCRIBER] = consumer.bound  # B's relay runs the same handler
    await start(consumers, consumer)
    await wait_for(lambda: acknowledged_everything(js), WAIT, "the batch taken and acknowledged")

    assert consumer.batches == [[m for p in range(4) for m in (ids[k][p] for k in keys)]]  # one batch, stream order
    sent = await sent_by_order(system_b.db)
    assert sent[keys[0]] == ids[keys[0]] and sent[keys[2]] == ids[keys[2]]  # the others committed
    assert sent[keys[1]] == ids[keys[1]][:1]  # the middle key stopped at its failure
    handed = await system_b.db.fetch("SELECT message_id, attempts, last_error FROM outbox WHERE status = 'pending' ORDER BY id")
    assert [r["message_id"] for r in handed] == ids[keys[1]][1:]  # the failure, its key's later ones behind it
    assert (handed[0]["attempts"], handed[0]["last_error"]) == (1, "RuntimeError: mail server down")
    taken = await system_b.db.fetchval("SELECT count(*) FROM inbox WHERE subscriber = $1", taken_name(SUBSCRIBER))
    assert taken == 12 and await system_b.db.fetchval("SELECT count(*) FROM inbox") == 12

    assert calls.count(failing) == 2  # the batch's attempt, then its own (careful) one
    mail_server["up"] = True
    await system_b.db.execute("UPDATE outbox SET available_at = now()")  # the retry pause is the policy's
    await Relay(system_b, instance_id="relay-b").drain()

    assert (await sent_by_order(system_b.db))[keys[1]] == ids[keys[1]]  # in order, each once
    assert await system_b.db.fetchval("SELECT count(*) FROM notifications_sent") == 12
    assert calls.count(failing) == 3  # and the relay's first delivery (last_error set) ran it, once
    assert await system_b.db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0


async def test_a_full_batch_is_one_pull_one_transaction_and_one_ack(system, db, js, system_b, consumers):  # noqa: F811
    orders = orders_in_partition(0, 8)
    for position in range(BATCH):
        await record_on_a(db, orders[position % len(orders)], position + 1)
    assert await Publisher(system, js, partitions=PARTITIONS).drain() == BATCH
    consumer = await start(consumers, Counting(system_b, js, SUBSCRIBER, partitions=PARTITIONS))

    await wait_for(lambda: acknowledged_everything(js), WAIT, "the batch acknowledged")
    assert [len(b) for b in consumer.batches] == [BATCH] and consumer.acks == 1
    info = await js.consumer_info(STREAM, durable_name(SUBSCRIBER, 0))
    assert (info.ack_floor.stream_seq, info.num_ack_pending, info.num_redelivered) == (BATCH, 0, 0)
    assert await system_b.db.fetchval("SELECT count(*) FROM notifications_sent") == BATCH


class DatabaseDownOnce(Counting):
    """The first batch's transaction fails (the database is away); meanwhile A publishes more."""

    more: list[uuid.UUID]

    async def handle(self, messages) -> None:
        if not getattr(self, "failed", False):
            self.failed = True
            self.batches = [[self.row_of(m)["message_id"] for m in messages]]
            self.more = [await record_on_a(self.a_db, self.order, p) for p in (4, 5)]
            await Publisher(self.a_system, self.js, partitions=PARTITIONS).drain()
            raise ConnectionError("connection to the database lost")
        await super().handle(messages)


async def test_a_batch_the_database_failed_comes_back_in_order_before_anything_new(
    system, db, js, system_b, consumers  # noqa: F811
):
    (order,) = orders_in_partition(0, 1)
    first = [await record_on_a(db, order, p) for p in (1, 2, 3)]
    await Publisher(system, js, partitions=PARTITIONS).drain()
    consumer = DatabaseDownOnce(system_b, js, SUBSCRIBER, partitions=PARTITIONS)
    consumer.a_db, consumer.a_system, consumer.order = db, system, order
    await start(consumers, consumer)

    await wait_for(lambda: system_b.db.fetchval("SELECT count(*) = 5 FROM notifications_sent"), WAIT, "all five")
    assert consumer.batches[0] == first
    assert [m for b in consumer.batches[1:] for m in b] == first + consumer.more  # the failed ones first, in order
    assert (await sent_by_order(system_b.db))[order] == first + consumer.more
