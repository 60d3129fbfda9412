"""Who pulls which partition, and how pull failures are told.

One consumer at a time pulls each (subscriber, partition): with batches in flight and
AckPolicy.ALL, a second puller would be served the messages after the first one's batch, apply
them first (the key's order broken) and acknowledge the first one's batch with its own ack. A
PostgreSQL advisory lock per partition, on a session of the consumer's own, decides: it goes with
the session when the process dies, so another replica takes the partition over."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

log = logging.getLogger("app.broker")

LOCK_SQL = "SELECT pg_try_advisory_lock(hashtext('switchboard.broker'), hashtext($1))"
UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtext('switchboard.broker'), hashtext($1))"


def durable_name(subscriber: str, partition: int) -> str:
    """JetStream names may not hold dots: `notifications.notify_customer` -> `notifications_notify_customer-p3`."""
    return f"{subscriber.replace('.', '_')}-p{partition}"


class PartitionLocks:
    """Which partitions of a subscriber this consumer pulls: PostgreSQL advisory locks on a session
    of its own (pooled sessions must not hold locks), so one consumer at a time pulls each
    partition, and a consumer that dies (its session with it) gives its partitions up."""

    def __init__(self, url: str, subscriber: str, application_name: str) -> None:
        self.url, self.subscriber, self.application_name = url, subscriber, application_name
        self.conn: asyncpg.Connection | None = None
        self.held: set[int] = set()
        self._use = asyncio.Lock()  # one statement at a time on the session

    async def take(self, partition: int) -> bool:
        """True if the partition was taken just now; `held` says whether it is held at all."""
        async with self._use:
            if self.conn is None or self.conn.is_closed():
                self.held.clear()  # the session's locks went with it
                settings = {"application_name": self.application_name}
                self.conn = await asyncpg.connect(self.url, server_settings=settings)
            if partition in self.held:
                return False
            if not await self.conn.fetchval(LOCK_SQL, durable_name(self.subscriber, partition)):
                return False
            self.held.add(partition)
            return True

    async def release(self, partition: int) -> None:
        async with self._use:
            if partition in self.held and self.conn is not None and not self.conn.is_closed():
                self.held.discard(partition)
                await self.conn.execute(UNLOCK_SQL, durable_name(self.subscriber, partition))

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()  # the partitions' locks go with the session


class PullHealth:
    """A consumer's pulls failing (a node lost, a leader being elected) are logged once when the
    first partition's fail and once when the last one's work again, not once a pull."""

    def __init__(self, subscriber: str) -> None:
        self.subscriber, self.failing = subscriber, set[int]()

    def fail(self, partition: int, error: BaseException) -> None:
        if not self.failing:
            log.warning("consumer %s: pulls failing: %s: %s", self.subscriber, type(error).__name__, error)
        self.failing.add(partition)

    def work(self, partition: int) -> None:
        if partition in self.failing:
            self.failing.discard(partition)
            if not self.failing:
                log.info("consumer %s: pulls work again", self.subscriber)
