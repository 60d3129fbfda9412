"""JetStream -> a subscriber on this database: one durable pull consumer per (subscriber,
partition), each delivering one message at a time (`max_ack_pending = 1`: the key's order, see
stream.py).

A message is applied in one transaction -- its `inbox` row, the handler's effects, their events
and outbox rows -- and acknowledged to JetStream only after that commit, so a crash in between
redelivers it and the inbox row makes the redelivery a no-op. That transaction keeps
`synchronous_commit` on (unlike the relay's deliveries): once acknowledged, JetStream never sends
the message again, so a commit lost in a database crash would be an effect lost for good.

JetStream's ack wait is the relay's lease (SWITCHBOARD_RELAY_LEASE), kept alive while the
message is handled by a progress signal every third of it, as the relay extends its leases: a
consumer that died mid-delivery (or lost its node) gives its message to another replica after
the lease, and a slow handler still keeps it. The acknowledgement after the commit is asked again
while no answer comes (the consumer's leader died with its node; the next one is elected within
seconds): with one message in flight per partition, a lost ack would otherwise hold the whole
partition for the ack wait.

A failure is nak'd with the subscription's backoff (the relay's retry policy, same settings);
the delivery that exhausts its attempts parks the message in this database's `dead_letters`
through the relay's own path: it becomes an outbox row of the subscriber, leased to this
consumer, which settle.py dead-letters (with the subscription's compensation). So `dlq list`,
`replay` (the local relay then delivers it) and `discard` work on it as on any other letter.
The key's later messages then join it in the outbox (QUEUE_BEHIND_SQL), as a commit's would:
ordered dead-lettering holds for messages from the broker too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import TYPE_CHECKING, Any

import msgspec

from app import observe
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
from app.conflicts import retry_on_conflict
from app.messages import PermanentError
from app.relay.policy import LeaseExpired, RetryPolicies
from app.relay.rows import call_one, open_row
from app.relay.settle import Outcome, settle

if TYPE_CHECKING:
    from app.bootstrap import System

log = logging.getLogger("app.broker")

INBOX_SQL = "INSERT INTO inbox (subscriber, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING 1"

# The message as an outbox row of its subscriber, leased to this consumer so that no relay claims
# it before settle() parks it. Already there (an earlier delivery parked it): nothing to do.
PARK_ROW_SQL = """
INSERT INTO outbox (message_id, position, subscriber, type, partition_key, payload, headers,
                    attempts, locked_by, locked_until, first_failed_at)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8, $9, now() + make_interval(secs => $10), now())
ON CONFLICT (subscriber, message_id) WHERE status <> 'delivered' DO NOTHING
RETURNING id, message_id, position, subscriber, type, payload, headers, attempts, 0.0::float8 AS age
"""
# A key with undelivered rows of this subscriber in this database's outbox (a dead letter and
# what waits behind it, or a replayed one the relay is delivering) continues there: the message
# joins them as a pending row, which the relay's claim holds back until every earlier row of its
# key is delivered -- so a parked key stays parked for messages from the broker too.
QUEUE_BEHIND_SQL = """
INSERT INTO outbox (message_id, position, subscriber, type, partition_key, payload, headers)
SELECT $1, $2, $3, $4, $5, $6::jsonb, $7::jsonb
WHERE EXISTS (SELECT 1 FROM outbox WHERE subscriber = $3 AND partition_key = $5 AND status <> 'delivered')
ON CONFLICT (subscriber, message_id) WHERE status <> 'delivered' DO NOTHING
RETURNING 1
"""
CONFLICT_RETRIES = 4  # a delivery that lost an optimistic-concurrency race decides again
FETCH_WAIT = 1.0  # a pull waits this long for a message before the loop checks for a stop
ACK_TIMEOUT = 1.0  # one acknowledgement's wait for JetStream's answer
ACK_PAUSE = 0.1  # between acknowledgements that got no answer
_encode = msgspec.json.Encoder().encode


def durable_name(subscriber: str, partition: int) -> str:
    """JetStream names may not hold dots: `notifications.notify_customer` -> `notifications_notify_customer-p3`."""
    return f"{subscriber.replace('.', '_')}-p{partition}"


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
        self.lease_seconds = settings.relay_lease_seconds
        # no ack and no progress this long (the consumer died mid-delivery): delivered again
        self.ack_wait = ack_wait or self.lease_seconds
        self.policies = RetryPolicies(system.subscriptions, settings)
        # the event types it reads from the stream (default: all of its own; see routes.py)
        self.topics = topics or [t.topic() for t in bound.event_types]
        self._subscriptions: list[Any] = []
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.applied = 0

    async def ensure(self) -> None:
        """Create (or update) the durable consumers and bind to them: idempotent."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        for partition in range(self.partitions):
            name = durable_name(self.subscriber, partition)
            config = ConsumerConfig(
                durable_name=name,
                filter_subjects=filters(partition, self.topics, self.prefix),
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                max_ack_pending=1,
                # No server-side limit: the delivery that exhausts the policy parks the message
                # here; a server limit would drop it silently if that delivery died.
                max_deliver=-1,
            )
            await self.js.add_consumer(self.stream, config)
            self._subscriptions.append(await self.js.pull_subscribe_bind(durable=name, stream=self.stream))

    def start(self) -> list[asyncio.Task]:
        self._tasks = [
            asyncio.create_task(self._consume(sub), name=f"consumer {self.subscriber} p{i}")
            for i, sub in enumerate(self._subscriptions)
        ]
        return self._tasks

    async def stop(self) -> None:
        """Stop pulling: each loop ends after its current pull (FETCH_WAIT) or message; one still
        running after the handler timeout is cancelled, its message redelivered after ack_wait."""
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

    async def _consume(self, sub) -> None:
        from nats.errors import TimeoutError as FetchTimeout

        while not self._stopping:
            try:
                messages = await sub.fetch(1, timeout=FETCH_WAIT)
            except FetchTimeout:
                continue
            except Exception as error:  # the broker is away: the client reconnects, pull again
                log.warning("consumer %s: fetch failed: %s", self.subscriber, error)
                await asyncio.sleep(FETCH_WAIT)
                continue
            for msg in messages:
                try:
                    await self.handle(msg)
                except Exception as error:  # the database or the broker: redelivered after ack_wait
                    log.warning("consumer %s: message %s left unsettled: %s: %s", self.subscriber,
                                msg.metadata.sequence.stream, type(error).__name__, error)  # fmt: skip

    async def handle(self, msg) -> None:
        """Settle the message while telling JetStream it is in progress (see the module's docstring)."""
        keeper = asyncio.create_task(self._keep(msg))
        try:
            await self.settle(msg)
        finally:
            keeper.cancel()

    async def _keep(self, msg) -> None:
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            with contextlib.suppress(Exception):  # disconnected: the next one may reach it
                await msg.in_progress()

    async def settle(self, msg) -> None:
        """Apply, then ack; or nak with backoff; or park and ack."""
        row = self.row_of(msg)
        policy = self.policies[self.subscriber]
        try:
            if row["attempts"] > policy.max_attempts:  # earlier deliveries died without an outcome
                raise LeaseExpired(f"gave up: {row['attempts'] - 1} deliveries ended without an outcome")
            async with asyncio.timeout(self.handler_timeout):
                await retry_on_conflict(self._apply, row, retries=CONFLICT_RETRIES)
        except Exception as error:
            if isinstance(error, (PermanentError, LeaseExpired)) or policy.exhausted(row["attempts"]):
                await self.park(row, error)
                await self.ack(msg)
            else:
                delay = policy.delay(row["attempts"])
                log.warning("consumer %s: retrying %s in %.2fs: %s: %s", self.subscriber, row["message_id"],
                            delay, type(error).__name__, error)  # fmt: skip
                await msg.nak(delay=delay)
            return
        await self.ack(msg)

    async def ack(self, msg) -> None:
        """After the commit (the seam where a test crashes before it). Waits for JetStream's
        answer, and acks again while none comes, for up to the ack wait: by then the message is
        delivered again, and the inbox absorbs that. (An ack repeated after one that landed is
        answered too.)"""
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

    async def _apply(self, row: dict) -> None:
        uow = self.system.uow()
        async with uow:
            conn = await uow.transaction()
            if await conn.fetchval(QUEUE_BEHIND_SQL, *self._columns(row)):
                await uow.commit()
                self.system.db.outbox_written()  # this process's relay delivers it in turn
                return
            if await conn.fetchval(INBOX_SQL, self.subscriber, row["message_id"]):
                event, envelope, headers = open_row(self.system.catalog, row)
                with observe.Delivery(row, headers):
                    await call_one(self.bound, event, envelope, uow.child())
                self.applied += 1
            await uow.commit()

    def row_of(self, msg) -> dict[str, Any]:
        """The message as the relay's rows look (what open_row and settle read); `id` is the
        stream sequence until it is parked."""
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

    def _columns(self, row: dict) -> tuple:
        """The outbox columns of the message: id, position, subscriber, type, key, payload, headers."""
        return (row["message_id"], row["position"], self.subscriber, row["type"], row["partition_key"],
                row["payload"].decode(), row["headers"].decode())  # fmt: skip

    async def park(self, row: dict, error: BaseException) -> None:
        """Dead-letter the message in this database (see the module's docstring)."""
        async with self.system.db.acquire() as conn:
            parked = await conn.fetchrow(
                PARK_ROW_SQL, *self._columns(row), row["attempts"], self.instance_id, self.lease_seconds
            )
        if parked is None:
            return  # parked by an earlier delivery whose ack was lost
        # its attempts are the deliveries: exhausted (or a PermanentError), so settle() parks it
        await settle(self.system, [Outcome(parked, error)], self.policies, self.instance_id)
