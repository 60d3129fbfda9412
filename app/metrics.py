"""The mediator's call metrics: plain numbers updated on the event loop's thread, exported by a
collector when /metrics is scraped. The collector is registered by whoever builds the app
(`register`), never on import, so importing the kernel leaves the global registry alone."""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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

    def of(self, module: str, message: str) -> CallStats:
        """The one CallStats of this pair, shared by every Mediator in the process."""
        return self.stats.setdefault((module, message), CallStats())

    def register(self, registry: CollectorRegistry = REGISTRY) -> None:
        """Export through `registry`; once per registry however often it is asked (every app
        built in one process asks)."""
        if not any(r is registry for r in self._registries):
            registry.register(self)
            self._registries.append(registry)

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
