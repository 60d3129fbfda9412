"""JetStream -> a subscriber on this database: one durable pull consumer per (subscriber,
partition), pulled a batch at a time (BATCH messages, `AckPolicy.ALL`), the batch applied in one
transaction (app/broker/apply.py) and acknowledged by one ack of its last message after the
commit. A crash in between redelivers the batch, and the inbox's taken-rows make it a no-op.

Why batches: one message per pull, one transaction and one replicated ack round trip each, made
the broker the bottleneck of every cross-database flow. `max_ack_pending = 1` held per-key order
across retries (a nak'd message kept the partition); now a failing message never goes back to
JetStream: apply.py hands it to this database's outbox, where the relay retries it and holds its
key's later messages behind it. What is left to keep the order is that one batch of a partition is
in flight at a time, whichever replica pulls: each partition is pulled only by the consumer holding
its PostgreSQL advisory lock (on a connection of the consumer's own, outside the pool), and a
consumer that takes a partition over while messages are still pending (its holder died
mid-batch) waits one ack wait before pulling, so those come back first -- JetStream redelivers
before it delivers anything new. With AckPolicy.ALL a second puller's ack would acknowledge the
first puller's batch too; the lock is what prevents that.

The batch transaction keeps `synchronous_commit` on: once acknowledged, JetStream never sends the
messages again. JetStream's ack wait is the relay's lease (SWITCHBOARD_RELAY_LEASE), kept alive
for every message of the batch while it is applied, as the relay extends its leases. A database
failure (not a handler's) naks the batch in order, so it comes back before anything new. The ack
is asked again while no answer comes (the consumer's leader died with its node)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import TYPE_CHECKING, Any

import msgspec

from app.broker.apply import Applier
from app.broker.partitions import PartitionLocks, PullHealth, durable_name
from app.broker.stream import (
    KEY_HEADER,
    PARTITIONS,
    POSITION_HEADER,
    STREAM,
    SUBJECTS,
    TYPE_HEADER,
    filters,
    metadata_of,
)

if TYPE_CHECKING:
    from app.bootstrap import System

log = logging.getLogger("app.broker")

BATCH = 64  # messages per pull, and the most a partition has unacknowledged
FETCH_WAIT = 1.0  # a pull waits this long for a message before the loop checks for a stop
MORE_WAIT = 0.5  # the rest of a batch, already waiting on the server: a bound, not a pause
ACK_TIMEOUT = 1.0  # one acknowledgement's wait for JetStream's answer
ACK_PAUSE = 0.1  # between acknowledgements that got no answer
_encode = msgspec.json.Encoder().encode


class Consumer:
    """One subscriber of this database fed from the stream, partition by partition."""

    def __init__(
        self,
        system: System,
        js,
        subscriber: str,
        *,
        instance_id: str | None = None,
        partitions: int = PARTITIONS,
        prefix: str = SUBJECTS,
        stream: str = STREAM,
        ack_wait: float | None = None,
        topics: list[str] | None = None,
    ) -> None:
        settings = system.settings
        bound = system.subscriptions.get(subscriber)
        if bound is None or bound.handler is None:
            raise ValueError(f"no subscription named {subscriber!r} is hosted here")
        self.system, self.js, self.subscriber, self.bound = system, js, subscriber, bound
        self.instance_id = instance_id or f"{settings.instance_id}-consumer"
        self.partitions, self.prefix, self.stream = partitions, prefix, stream
        self.handler_timeout = settings.relay_handler_timeout
        # no ack and no progress this long (the consumer died mid-batch): delivered again
        self.ack_wait = ack_wait or settings.relay_lease_seconds
        # the event types it reads from the stream (default: all of its own; see routes.py)
        self.topics = topics or [t.topic() for t in bound.event_types]
        self._subscriptions: list[Any] = []
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._locks = PartitionLocks(system.db.url, subscriber, f"{self.instance_id} {subscriber}")
        self._pulls = PullHealth(subscriber)

    applied = property(lambda self: self.applier.applied)

    @property
    def applier(self) -> Applier:
        applier = self.__dict__.get("_applier")
        if applier is None or applier.bound is not self.bound:  # tests swap the handler in
            applier = self.__dict__["_applier"] = Applier(self.system, self.subscriber, self.bound, self.instance_id)
        return applier

    async def ensure(self) -> None:
        """Create (or update) the durable consumers and bind to them: idempotent."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        for partition in range(self.partitions):
            name = durable_name(self.subscriber, partition)
            config = ConsumerConfig(
                durable_name=name,
                filter_subjects=filters(partition, self.topics, self.prefix),
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.ALL,
                ack_wait=self.ack_wait,
                max_ack_pending=BATCH,
                max_deliver=-1,  # failures are the outbox's to count; a server limit would drop silently
            )
            await self.js.add_consumer(self.stream, config)
            self._subscriptions.append(await self.js.pull_subscribe_bind(durable=name, stream=self.stream))

    def start(self) -> list[asyncio.Task]:
        self._tasks = [
            asyncio.create_task(self._consume(i, sub), name=f"consumer {self.subscriber} p{i}")
            for i, sub in enumerate(self._subscriptions)
        ]
        return self._tasks

    async def stop(self) -> None:
        """Stop pulling: each loop ends after its current pull (FETCH_WAIT) or batch; one still
        running after the handler timeout is cancelled, its batch redelivered after ack_wait."""
        self._stopping = True
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=FETCH_WAIT + self.handler_timeout)
            for task in late:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self._locks.close()

    async def _consume(self, partition: int, sub) -> None:
        try:
            await self._pull(partition, sub)
        finally:  # stopped, or died of something unforeseen: another consumer may take it now
            with contextlib.suppress(Exception):
                await self._locks.release(partition)

    async def _pull(self, partition: int, sub) -> None:
        from nats.errors import TimeoutError as FetchTimeout

        while not self._stopping:
            if not await self._take(partition):
                await asyncio.sleep(FETCH_WAIT)
                continue
            try:
                messages = await self._fetch(sub)
            except FetchTimeout:
                self._pulls.work(partition)
                continue
            except (Exception, asyncio.CancelledError) as error:  # the broker is away: pull again
                if isinstance(error, asyncio.CancelledError) and asyncio.current_task().cancelling():
                    raise  # this loop is being stopped, not the client's request
                self._pulls.fail(partition, error)
                await asyncio.sleep(FETCH_WAIT)
                continue
            self._pulls.work(partition)
            if not messages:
                continue
            try:
                await self.handle(messages)
            except Exception as error:  # the database or the broker: the batch comes back first
                log.warning("consumer %s: %d message(s) from %s left unsettled: %s: %s", self.subscriber,
                            len(messages), messages[0].metadata.sequence.stream, type(error).__name__, error)  # fmt: skip
                await self._give_back(messages)
                await asyncio.sleep(FETCH_WAIT)

    async def _fetch(self, sub) -> list:
        """A long poll for the first message, then a request for exactly the ones waiting behind it:
        one request for BATCH would be held open until BATCH came, delaying a batch not full."""
        batch = await sub.fetch(1, timeout=FETCH_WAIT)
        more = min(BATCH - 1, batch[0].metadata.num_pending)
        if more:
            with contextlib.suppress(Exception):  # what came is a batch: the rest comes next pull
                batch += await sub.fetch(more, timeout=MORE_WAIT)
        return batch

    async def _take(self, partition: int) -> bool:
        """Whether this consumer holds the partition (now or already). A partition taken while
        messages are pending waits one ack wait: those are redelivered before new ones."""
        try:
            if not await self._locks.take(partition):
                return partition in self._locks.held
            info = await self.js.consumer_info(self.stream, durable_name(self.subscriber, partition))
            if info.num_ack_pending:
                await asyncio.sleep(self.ack_wait)  # a dead holder's batch: its redelivery comes first
            return True
        except Exception as error:
            self._pulls.fail(partition, error)
            return False

    async def _give_back(self, messages) -> None:
        """Nak the batch in stream order: JetStream delivers it again, in that order, before anything new."""
        for msg in messages:
            with contextlib.suppress(Exception):  # not answered: redelivered after the ack wait
                await msg.nak()

    async def handle(self, messages: list) -> None:
        """Apply the batch while telling JetStream it is in progress, then ack its last message."""
        keeper = asyncio.create_task(self._keep(messages))
        try:
            await self.applier.apply([self.row_of(msg) for msg in messages])
        finally:
            keeper.cancel()
        await self.ack(messages[-1])

    async def _keep(self, messages: list) -> None:
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            for msg in messages:  # each pending message has its own timer
                with contextlib.suppress(Exception):  # disconnected: the next one may reach it
                    await msg.in_progress()

    async def ack(self, msg) -> None:
        """After the commit (the seam where a test crashes before it); acknowledges every message
        before it too. Waits for JetStream's answer, and acks again while none comes, for up to the
        ack wait: by then the batch is delivered again, and the taken-rows absorb that."""
        from nats.errors import Error as NatsError

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_wait
        while True:
            try:
                await msg.ack_sync(timeout=ACK_TIMEOUT)
                return
            except NatsError:  # no answer, no responder, reconnecting: the same ack again
                if loop.time() + ACK_PAUSE >= deadline:
                    raise
                await asyncio.sleep(ACK_PAUSE)

    def row_of(self, msg) -> dict[str, Any]:
        """The message as the relay's rows look (what open_row and settle read)."""
        headers = msg.headers or {}
        return {
            "id": msg.metadata.sequence.stream,
            "message_id": uuid.UUID(headers["Nats-Msg-Id"]),
            "position": int(headers.get(POSITION_HEADER, 0)),
            "subscriber": self.subscriber,
            "type": headers[TYPE_HEADER],
            "partition_key": headers.get(KEY_HEADER, ""),
            "payload": msg.data,
            "headers": _encode(metadata_of(headers)),
            "attempts": msg.metadata.num_delivered,
            "age": 0.0,
        }
