"""What /metrics answers: every family of this process, or of every worker of `serve`.

Gauges of the process's own state (breakers, bulkheads, the database pool) are read from the live
objects when they are exported, so the call path pays nothing for them; the database-derived ones
come from `DatabaseGauges`, refreshed by a scrape that finds them stale.

One process (tests, an app built in code): the global registry is exported as it stands. Several
workers (PROMETHEUS_MULTIPROC_DIR, set by `serve`): each worker writes its series to files in that
directory -- counters and histograms as they change, its process gauges and the mediator's call
numbers every FLUSH_SECONDS and before it answers a scrape -- and a scrape merges every worker's
files, so whichever worker answers shows the whole instance. A worker's live gauges (`live*`
modes) go with it: when it stops, or, if it was killed, at the next scrape."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import re
from collections.abc import AsyncIterator

import aiobreaker
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest, multiprocess

from app.broker.metrics import METRICS as BROKER_METRICS
from app.broker.metrics import BrokerMetrics
from app.http_metrics import HTTP_SECONDS
from app.metrics import METRICS, MULTIPROCESS
from app.metrics_db import GAUGES, DatabaseGauges
from app.pids import alive

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0

BREAKER_OPEN = Gauge(
    "switchboard_breaker_open",
    "1 while a module's circuit breaker is not closed, as this instance's workers see it",
    ("module",),
    multiprocess_mode="livemax",
    registry=None,
)
BULKHEAD_IN_FLIGHT = Gauge(
    "switchboard_bulkhead_in_flight",
    "Calls in flight per module (its bulkhead's count), every worker of the instance",
    ("module",),
    multiprocess_mode="livesum",
    registry=None,
)
POOL_CONNECTIONS = Gauge(
    "switchboard_db_pool_connections",
    "Database pool connections: in_use, idle, and the pools' max size",
    ("state",),
    multiprocess_mode="livesum",
    registry=None,
)
_OWN = (*GAUGES, BREAKER_OPEN, BULKHEAD_IN_FLIGHT, POOL_CONNECTIONS, HTTP_SECONDS, *BROKER_METRICS)
_registered: list[CollectorRegistry] = []
_LIVE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db$")


def register(registry: CollectorRegistry = REGISTRY) -> None:
    """One process: export through `registry`, once however many apps ask."""
    METRICS.register(registry)
    if not any(r is registry for r in _registered):
        for metric in _OWN:
            registry.register(metric)
        _registered.append(registry)


class Exporter:
    """The /metrics answer of one app; `runtime` holds its system once the lifespan started it."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.database = DatabaseGauges()
        self.broker = BrokerMetrics()

    def read_process(self) -> None:
        system = self.runtime.system
        if system is None:
            return
        mediator = system.mediator
        if mediator is not None:
            for module, breaker in mediator.breakers.items():
                closed = breaker.current_state is aiobreaker.CircuitBreakerState.CLOSED
                BREAKER_OPEN.labels(module).set(0 if closed else 1)
            for module, bulkhead in mediator.bulkheads.items():
                BULKHEAD_IN_FLIGHT.labels(module).set(bulkhead.in_flight)
        pool = system.db.pool
        if pool is not None:
            idle = pool.get_idle_size()
            POOL_CONNECTIONS.labels("in_use").set(pool.get_size() - idle)
            POOL_CONNECTIONS.labels("idle").set(idle)
            POOL_CONNECTIONS.labels("max").set(pool.get_max_size())
        link = getattr(self.runtime, "broker", None)
        if link is not None:
            self.broker.read(link)

    def flush(self) -> None:
        self.read_process()
        if MULTIPROCESS:
            METRICS.flush()
            HTTP_SECONDS.flush()

    async def scrape(self) -> bytes:
        system = self.runtime.system
        if system is not None and system.db.pool is not None:
            await self.database.refresh_if_stale(system.db, system.subscriptions)
        link = getattr(self.runtime, "broker", None)
        if link is not None and link.js is not None:
            await self.broker.refresh_if_stale(link)
        self.flush()
        if not MULTIPROCESS:
            return generate_latest(REGISTRY)
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        _forget_dead_workers(directory)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry)

    @contextlib.asynccontextmanager
    async def lifespan(self, app) -> AsyncIterator[None]:
        """Several workers: flush this one's numbers periodically, so a scrape answered by another
        worker sees them; on the way out, flush once more and withdraw its live gauges."""
        if not MULTIPROCESS:
            yield
            return
        task = asyncio.create_task(self._flush_periodically())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.flush()
            multiprocess.mark_process_dead(os.getpid())

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                self.flush()
            except Exception:  # a metrics hiccup must not end the loop
                log.exception("metrics: flush failed")


def _forget_dead_workers(directory: str) -> None:
    """A killed worker never withdrew its live gauges (a stopped one did): drop them now."""
    for path in glob.glob(os.path.join(directory, "gauge_live*.db")):
        match = _LIVE_FILE.search(os.path.basename(path))
        if match and not alive(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), directory)
