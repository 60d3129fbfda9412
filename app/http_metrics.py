"""HTTP request durations by method, route template and status code.

The route label is the template the router matched (`/orders/{order_id}`), never the raw
path: every order id would otherwise be a series of its own. Requests that match no route (404,
405) share one label value, and methods outside the standard ones share another, for the same
reason."""

from __future__ import annotations

import time

from prometheus_client import Histogram

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_SECONDS = Histogram(
    "switchboard_http_request_duration_seconds",
    "HTTP request duration, until the response is sent",
    ("method", "route", "status"),
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=None,
)


def http_metrics_middleware(app):
    """Outermost ASGI wrapper: times every HTTP request. The router writes the matched template
    into the scope it is handed (`path_template`), which is this same dict, so it is read after."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        status = 500  # nothing sent: the request failed before any response

        async def record_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await app(scope, receive, record_status)
        finally:
            method = scope.get("method", "")
            HTTP_SECONDS.labels(
                method if method in METHODS else "other", scope.get("path_template") or UNMATCHED, str(status)
            ).observe(time.perf_counter() - started)

    return middleware
