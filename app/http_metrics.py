"""HTTP request durations by method, route template and status code.

The route label is the template the router matched (`/orders/{order_id}`), never the raw
path: every order id would otherwise be a series of its own. Requests that match no route (404,
405) share one label value, and methods outside the standard ones share another, for the same
reason.

As the mediator's call metrics (app/metrics.py): plain numbers updated on the event loop's thread
by the request (`HTTP_SECONDS.record`, from app/http.py's edge), exported as the histogram
prometheus_client's Histogram gave when /metrics is scraped. Histogram.labels().observe() on
every request took a lock and, under `serve`, wrote the worker's files; here `flush()` passes the
growth on to those files periodically and before each scrape instead."""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
NAME = "switchboard_http_request_duration_seconds"
DOC = "HTTP request duration, until the response is sent"
LABELS = ("method", "route", "status")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BUCKET_NAMES = [floatToGoString(bound) for bound in (*BUCKETS, math.inf)]


class Durations:
    """One (method, route, status)'s histogram: counts per bucket (not cumulative, +Inf last)."""

    __slots__ = ("buckets", "sum", "created")

    def __init__(self) -> None:
        self.buckets = [0] * len(_BUCKET_NAMES)
        self.sum = 0.0
        self.created = time.time()


class HttpDurations(Collector):
    def __init__(self) -> None:
        self.series: dict[tuple[str, str, str], Durations] = {}
        self._flushed: dict[tuple[str, str, str], Durations] = {}
        self._shared: Histogram | None = None

    def record(self, method: str, route: str | None, status: int, seconds: float) -> None:
        key = (method if method in METHODS else "other", route or UNMATCHED, str(status))
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Durations()
        series.buckets[bisect_left(BUCKETS, seconds)] += 1  # the first bound >= seconds
        series.sum += seconds

    def flush(self) -> None:
        """Add each series' growth since the last flush to the file-backed histogram of the same
        name (multiprocess mode: MultiProcessCollector exports that, not this collector)."""
        if self._shared is None:
            self._shared = Histogram(NAME, DOC, LABELS, buckets=BUCKETS, registry=None)
        for key, series in list(self.series.items()):
            done = self._flushed.get(key)
            if done is None:
                done = self._flushed[key] = Durations()
            child = self._shared.labels(*key)
            for i, count in enumerate(series.buckets):
                if count != done.buckets[i]:
                    child._buckets[i].inc(count - done.buckets[i])
                    done.buckets[i] = count
            if series.sum != done.sum:
                child._sum.inc(series.sum - done.sum)
                done.sum = series.sum

    def collect(self) -> Iterator[Metric]:
        durations = HistogramMetricFamily(NAME, DOC, labels=LABELS)
        created = GaugeMetricFamily(f"{NAME}_created", DOC, labels=LABELS)  # what Histogram exports beside it
        for key, series in list(self.series.items()):
            durations.add_metric(key, list(zip(_BUCKET_NAMES, accumulate(series.buckets), strict=True)), series.sum)
            created.add_metric(key, series.created)
        yield durations
        yield created


HTTP_SECONDS = HttpDurations()  # process-wide; registered by app/metrics_export.py
