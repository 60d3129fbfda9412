"""The mediator's call metrics: plain numbers updated on the event loop's thread, exported by a
collector when /metrics is scraped. The collector is registered by whoever builds the app
(`register`), never on import, so importing the kernel leaves the global registry alone.

With several server workers (`serve` sets PROMETHEUS_MULTIPROC_DIR before they start) a scrape
reaches one worker but must show them all: there `flush()` adds what the numbers counted since the
last flush to prometheus_client's file-backed metrics, which every worker's scrape reads. The call
path stays the same plain numbers; the flush runs periodically and before each scrape."""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# prometheus_client picks its value store once, on import, by this variable: so do we.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
OUTCOMES = ("ok", "rejected", "unavailable", "error")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5)
_BUCKET_NAMES = [floatToGoString(bound) for bound in (*LATENCY_BUCKETS, math.inf)]


class CallStats:
    """Calls per outcome and their latency histogram for one (module, message type)."""

    __slots__ = ("outcomes", "buckets", "sum", "created")

    def __init__(self) -> None:
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.buckets = [0] * len(_BUCKET_NAMES)  # not cumulative; the last one is +Inf
        self.sum = 0.0
        self.created = time.time()

    def record(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome] += 1
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bound >= seconds
        self.sum += seconds


class MediatorMetrics(Collector):
    """Exports every CallStats as the series prometheus_client's Counter and Histogram gave:
    switchboard_mediator_calls_total{module,message,outcome} and the histogram
    switchboard_mediator_seconds{module,message}. Those take a lock on each update, on every
    call; CallStats are plain numbers, read here only when /metrics is scraped."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], CallStats] = {}
        self._registries: list[CollectorRegistry] = []
        self._flushed: dict[tuple[str, str], CallStats] = {}  # what flush() has passed on so far
        self._shared: tuple[Counter, Histogram] | None = None

    def of(self, module: str, message: str) -> CallStats:
        """The one CallStats of this pair, shared by every Mediator in the process."""
        return self.stats.setdefault((module, message), CallStats())

    def register(self, registry: CollectorRegistry = REGISTRY) -> None:
        """Export through `registry`; once per registry however often it is asked (every app
        built in one process asks)."""
        if not any(r is registry for r in self._registries):
            registry.register(self)
            self._registries.append(registry)

    def flush(self) -> None:
        """Add each CallStats' growth since the last flush to the file-backed series of the same
        names (multiprocess mode; MultiProcessCollector exports those, not this collector)."""
        if self._shared is None:
            self._shared = (
                Counter("switchboard_mediator_calls", "Mediator calls", ("module", "message", "outcome"), registry=None),
                Histogram(
                    "switchboard_mediator_seconds",
                    "Mediator call duration",
                    ("module", "message"),
                    registry=None,
                    buckets=LATENCY_BUCKETS,
                ),
            )
        calls, latency = self._shared
        for key, stats in list(self.stats.items()):
            done = self._flushed.get(key)
            if done is None:
                done = self._flushed[key] = CallStats()
                for outcome in OUTCOMES:  # every outcome shows from the start, as with one process
                    calls.labels(*key, outcome)
            for outcome, count in stats.outcomes.items():
                if count != done.outcomes[outcome]:
                    calls.labels(*key, outcome).inc(count - done.outcomes[outcome])
                    done.outcomes[outcome] = count
            child = latency.labels(*key)
            # Histogram.observe() takes one value; the buckets here are already counted. Its
            # per-bucket values (not cumulative, +Inf last: the layout CallStats keeps) take them.
            for i, count in enumerate(stats.buckets):
                if count != done.buckets[i]:
                    child._buckets[i].inc(count - done.buckets[i])
                    done.buckets[i] = count
            if stats.sum != done.sum:
                child._sum.inc(stats.sum - done.sum)
                done.sum = stats.sum

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "switchboard_mediator_calls", "Mediator calls", labels=("module", "message", "outcome")
        )
        latency = HistogramMetricFamily(
            "switchboard_mediator_seconds", "Mediator call duration", labels=("module", "message")
        )
        latency_created = GaugeMetricFamily(  # what Histogram exports beside it
            "switchboard_mediator_seconds_created", "Mediator call duration", labels=("module", "message")
        )
        for (module, message), stats in list(self.stats.items()):
            for outcome, count in stats.outcomes.items():
                calls.add_metric((module, message, outcome), count, created=stats.created)
            cumulative = zip(_BUCKET_NAMES, accumulate(stats.buckets), strict=True)
            latency.add_metric((module, message), list(cumulative), stats.sum)
            latency_created.add_metric((module, message), stats.created)
        yield calls
        yield latency
        yield latency_created


METRICS = MediatorMetrics()  # process-wide, like the registry it is exported through
