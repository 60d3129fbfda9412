"""The broker's metrics: whether this process is connected, what it published and applied, and
what JetStream still holds for this group's subscribers (the lag across databases, which no
outbox table shows). Read from the live link when /metrics is answered; the JetStream numbers
are asked of the cluster at most every MAX_AGE seconds."""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Counter, Gauge

log = logging.getLogger("app.broker")

MAX_AGE = 5.0
TIMEOUT = 2.0

CONNECTED = Gauge(
    "switchboard_broker_connected",
    "1 while this process is connected to a JetStream server (SWITCHBOARD_NATS_URL), by the modules it hosts",
    ("modules",),  # labelled: an instance with no broker exports no sample at all
    multiprocess_mode="livemax",
    registry=None,
)
PUBLISHED = Counter(
    "switchboard_broker_published_total",
    "Events published to JetStream from this database's outbox (acknowledged by JetStream, then in the outbox)",
    registry=None,
)
CONSUMED = Counter(
    "switchboard_broker_consumed_total",
    "Messages from JetStream applied by a subscriber hosted here (inbox row and effects committed)",
    ("subscriber",),
    registry=None,
)
PENDING = Gauge(
    "switchboard_broker_pending",
    "Messages JetStream holds for a subscriber hosted here: not delivered yet, or delivered and not acknowledged",
    ("subscriber",),
    multiprocess_mode="mostrecent",
    registry=None,
)
METRICS = (CONNECTED, PUBLISHED, CONSUMED, PENDING)


class BrokerMetrics:
    def __init__(self) -> None:
        self._counted: dict[object, int] = {}  # what each publisher/consumer's count was last read at
        self.read_at: float | None = None
        self._refresh: asyncio.Task | None = None

    def read(self, link) -> None:
        """The process's own numbers: counters advance by what was done since the last read."""
        group = ",".join(sorted(link.system.hosted))
        CONNECTED.labels(group).set(1 if link.nc is not None and link.nc.is_connected else 0)
        if link.publisher is not None:
            PUBLISHED.inc(self._delta(link.publisher, link.publisher.published))
        for consumer in link.consumers:
            CONSUMED.labels(consumer.subscriber).inc(self._delta(consumer, consumer.applied))

    def _delta(self, source: object, count: int) -> int:
        delta = count - self._counted.get(source, 0)
        self._counted[source] = count
        return max(delta, 0)

    async def refresh_if_stale(self, link) -> None:
        if self.read_at is not None and time.monotonic() - self.read_at < MAX_AGE:
            return
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._read_pending(link))
        try:  # shielded: a scrape that gives up does not cancel the reading
            await asyncio.wait_for(asyncio.shield(self._refresh), TIMEOUT)
        except Exception as error:  # the cluster is away: the last reading stays
            log.warning("metrics: broker backlog not read: %s", f"{type(error).__name__}: {error}")

    async def _read_pending(self, link) -> None:
        from app.broker.consumer import durable_name

        for consumer in link.consumers:
            held = 0
            for partition in range(consumer.partitions):
                info = await link.js.consumer_info(consumer.stream, durable_name(consumer.subscriber, partition))
                held += info.num_pending + info.num_ack_pending
            PENDING.labels(consumer.subscriber).set(held)
        self.read_at = time.monotonic()

