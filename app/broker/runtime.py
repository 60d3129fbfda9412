"""What a serving process runs when SWITCHBOARD_NATS_URL is set: one connection to the JetStream
cluster, the stream (created or brought to this configuration), the publisher of this database's
`broker.publish` rows, a consumer for each hosted subscriber of another group's events, and the
transport's responders for the commands and queries of the modules hosted here.

Every replica of a group runs all of them: the publisher's claims and the consumers' durable
names are shared, so replicas split the work and one that dies is covered by the others."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

from app.broker.apply import taken_name
from app.broker.consumer import Consumer
from app.broker.publisher import Publisher
from app.broker.routes import PUBLISHER
from app.broker.stream import cluster_size, ensure_stream

if TYPE_CHECKING:
    from app.bootstrap import System

log = logging.getLogger("app.broker")

RECONNECT_WAIT = 0.5  # seconds between reconnection attempts: a lost node's clients move on fast
CONNECT_TIMEOUT = 2.0


class BrokerUnreachable(Exception):
    """No server of SWITCHBOARD_NATS_URL answered at start."""


def servers_of(url: str) -> list[str]:
    return [part.strip() for part in url.split(",") if part.strip()]


class BrokerLink:
    def __init__(self, system: System, *, responders: bool = True) -> None:
        self.system = system
        self.responders = responders  # a relay-only process answers no calls
        self.nc = None
        self.js = None
        self.publisher: Publisher | None = None
        self.consumers: list[Consumer] = []
        self.live_since: float | None = None  # connected since (monotonic); None: not connected

    async def start(self) -> None:
        import nats
        from nats.errors import NoServersError

        system, settings = self.system, self.system.settings
        servers = servers_of(settings.nats_url or "")
        try:
            self.nc = await nats.connect(
                servers,
                name=settings.instance_id,
                connect_timeout=CONNECT_TIMEOUT,
                reconnect_time_wait=RECONNECT_WAIT,
                max_reconnect_attempts=-1,  # the outbox holds what cannot be published meanwhile
                error_cb=self._error,
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
            )
        except (NoServersError, OSError, TimeoutError) as error:
            raise BrokerUnreachable(f"no JetStream server answered at {', '.join(servers)}: {error}") from error
        self.live_since = time.monotonic()
        self.js = self.nc.jetstream()
        await ensure_stream(self.js, replicas=cluster_size(self.nc))
        if any(PUBLISHER in names for names in system.catalog.subscribers.values()):
            self.publisher = Publisher(system, self.js)
            self.publisher.start()
        topics = system.from_broker
        for subscriber, consumed in topics.items():
            consumer = Consumer(system, self.js, subscriber, topics=consumed)
            await consumer.ensure()
            consumer.start()
            self.consumers.append(consumer)
        system.inbox_holds = self.inbox_holds
        attach = getattr(system.transport, "attach", None)
        if attach is not None and self.responders:  # the NATS transport's responders for the modules hosted here
            await attach(self.nc, system)
        log.info("broker: connected to %s; publishing: %s; consuming: %s", self.nc.connected_url.netloc,
                 self.publisher is not None, ", ".join(topics) or "nothing")  # fmt: skip

    async def stop(self) -> None:
        """The publisher finishes its batch, the consumers their messages; then the connection
        drains (replies and acks in flight are flushed)."""
        if self.publisher is not None:
            await self.publisher.stop()
        for consumer in self.consumers:
            await consumer.stop()
        if self.responders and hasattr(self.system.transport, "attach"):
            await self.system.transport.close()  # calls being answered get their replies out first
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    def inbox_holds(self) -> frozenset[str]:
        """The inbox names whose rows the purge must keep now: the consumers' taken-rows
        (`broker:<subscriber>`). A message JetStream still holds unacknowledged (taken and
        committed, then its consumer died before the ack) comes back within the consumers'
        ack_wait once they pull again, and its taken-row is what makes it a no-op: so the rows stay until this link's consumers have been pulling, connected, for
        twice that long. While the link is down they all stay."""
        if not self.consumers:
            return frozenset()
        window = 2 * max(c.ack_wait for c in self.consumers)
        if self.live_since is not None and time.monotonic() - self.live_since >= window:
            return frozenset()
        return frozenset(taken_name(c.subscriber) for c in self.consumers)

    async def _error(self, error: Exception) -> None:
        log.warning("broker: %s: %s", type(error).__name__, error)

    async def _disconnected(self) -> None:
        self.live_since = None
        log.warning("broker: disconnected, reconnecting")

    async def _reconnected(self) -> None:
        self.live_since = time.monotonic()
        log.info("broker: reconnected to %s", self.nc.connected_url.netloc if self.nc else "?")


def probe(url: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Before a server starts: None if some server of the URL accepts a connection, else why not
    (so a wrong SWITCHBOARD_NATS_URL is one line at start, not a failure in every worker)."""
    import socket
    from urllib.parse import urlsplit

    failures = []
    for server in servers_of(url):
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        try:
            with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout):
                return None
        except (OSError, ValueError) as error:
            failures.append(f"{server}: {error}")
    return "; ".join(failures) or "no server given"
