"""Logs and traces, one design: each request, mediator call and relay delivery sets a contextvar or
two (app/context.py), and a span only when tracing is on. Log lines read those contextvars when
they are written (`add_context`, a structlog processor), so the hot path builds no dicts for
them. Spans hang off OpenTelemetry's context; an event carries the span that recorded it in its
metadata (`traceparent`, app/eventstore.py), and the relay parents each delivery's span on it, so
one trace follows an order from its request through every subscriber, in whatever process.

Logs: app/logs.py (structlog; the stdlib `logging` calls routed through it). Traces: OpenTelemetry, configured only by the
standard OTEL_* variables; with none set there is no provider, no exporter thread, and each
span site checks one flag (TRACING)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from app import context
from app.settings import SettingsError

TRACING = False  # a tracer is installed (setup_tracing / use_tracer): span sites check this first
DEBUG = False  # debug lines are written (app/logs.py sets it): one per mediator call, request, delivery

NOTHING = nullcontext()  # what `span()` returns with tracing off: reusable, does nothing

_tracer: trace.Tracer | None = None
_provider: Any = None  # the SDK provider this process installed, flushed at shutdown
_propagator = TraceContextTextMapPropagator()
calls_log = logging.getLogger("app.mediator")
relay_log = logging.getLogger("app.relay")
http_log = logging.getLogger("app.http")


# -- traces ----------------------------------------------------------------------------------------


def setup_tracing(environ: Mapping[str, str] | None = None) -> bool:
    """Install a tracer provider and its exporter from the OTEL_* variables, once per process.
    None set (or OTEL_TRACES_EXPORTER=none, or OTEL_SDK_DISABLED=true): tracing stays off."""
    if _provider is not None:
        return TRACING
    kinds = exporters_configured(environ)
    if not kinds:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = [_exporter(kind) for kind in kinds]
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if resource.attributes.get(SERVICE_NAME, "").startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "switchboard"}))
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER(_ARG)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    use_tracer(provider)
    return True


def exporters_configured(environ: Mapping[str, str] | None = None) -> list[str]:
    """The exporters the OTEL_* variables ask for ("console", "http/protobuf", "grpc"); none: off.
    A value no exporter matches is a SettingsError (`serve` checks before starting workers)."""
    env = os.environ if environ is None else environ
    if not any(name.startswith("OTEL_") for name in env):
        return []
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    kinds = []
    for name in (n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")):
        if name == "otlp":
            if protocol.strip() not in ("http/protobuf", "grpc"):
                raise SettingsError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not http/protobuf or grpc")
            kinds.append(protocol.strip())
        elif name == "console":
            kinds.append(name)
        elif name not in ("none", ""):
            raise SettingsError(f"OTEL_TRACES_EXPORTER={name!r} is not otlp, console or none")
    return kinds


def _exporter(kind: str) -> Any:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()  # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_* as the SDK reads them


def use_tracer(provider: Any) -> None:
    """Trace with `provider` (tests give theirs, with an in-memory exporter); None: tracing off."""
    global TRACING, _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("switchboard") if provider is not None else None
    TRACING = provider is not None


def shutdown_tracing() -> None:
    """Export what the batch processor still holds (a worker's last spans) before the exit."""
    if _provider is not None and hasattr(_provider, "force_flush"):
        _provider.force_flush(5_000)


def span(name: str, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None) -> Any:
    """A context manager: a span made current while it runs, or NOTHING with tracing off."""
    if not TRACING:
        return NOTHING
    return _tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def traceparent() -> str | None:
    """The W3C traceparent of the current span, for an event's metadata."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"


def inject(headers: dict[str, str]) -> None:
    """Add the current trace context to an outgoing call's headers (the remote transport's)."""
    _propagator.inject(headers)


def claimed(rows: list, began: int, instance_id: str) -> None:
    """The relay's claim as a span of its own, linked to the spans that recorded its rows' events
    (a batch mixes traces: no single parent)."""
    links = []
    for row in rows:
        parent = trace.get_current_span(_propagator.extract(_decode_headers(row["headers"]))).get_span_context()
        if parent.is_valid:
            links.append(trace.Link(parent))
    attributes = {"switchboard.rows": len(rows), "switchboard.instance": instance_id}
    _tracer.start_span("relay claim", attributes=attributes, links=links, start_time=began).end()


def call_span(scope: tuple[str, str]) -> tuple[Any, object]:
    """A mediator call's span, made current: (span, token) for `end_call`."""
    module, name = scope
    span = _tracer.start_span(name, attributes={"switchboard.module": module, "switchboard.message": name})
    return span, otel_context.attach(trace.set_span_in_context(span))


def end_call(span: tuple[Any, object] | None, outcome: str, started: float) -> None:
    """End a mediator call's span with its outcome; at debug, its line (in its log scope still)."""
    if DEBUG:
        calls_log.debug("call %s", outcome, extra={"fields": {"outcome": outcome,
                        "seconds": round(time.perf_counter() - started, 6)}})  # fmt: skip
    if span is not None:
        current, token = span
        otel_context.detach(token)
        current.set_attribute("switchboard.outcome", outcome)
        if outcome == "error":
            current.set_status(StatusCode.ERROR)
        current.end()


class Delivery:
    """One relay delivery's log scope, its span -- a child of the span that recorded the event,
    from the row's headers -- and, at debug, its line with the handler's outcome."""

    __slots__ = ("row", "headers", "tokens", "span", "attached", "started")

    def __init__(self, row: Any, headers: Mapping[str, Any]) -> None:
        self.row, self.headers = row, headers

    def __enter__(self) -> Delivery:
        row = self.row
        subscriber = row["subscriber"]
        self.tokens = (
            context.scope.set((subscriber.partition(".")[0], row["type"])),
            context.delivery.set((subscriber, row["id"], row["attempts"])),
        )
        self.span = None
        if TRACING:
            attributes = {"switchboard.subscriber": subscriber, "switchboard.outbox_id": row["id"],
                          "switchboard.attempt": row["attempts"], "switchboard.message": row["type"]}  # fmt: skip
            parent = _propagator.extract(self.headers)
            self.span = _tracer.start_span(subscriber, parent, SpanKind.CONSUMER, attributes)
            self.attached = otel_context.attach(trace.set_span_in_context(self.span))
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        outcome = "ok" if error is None else type(error).__name__
        if DEBUG:
            seconds = round(time.perf_counter() - self.started, 6)
            relay_log.debug("delivery %s", outcome, extra={"fields": {"outcome": outcome, "seconds": seconds}})
        if self.span is not None:
            otel_context.detach(self.attached)
            self.span.set_attribute("switchboard.outcome", outcome)
            if error is not None:
                self.span.set_status(StatusCode.ERROR, f"{outcome}: {error}"[:500])
            self.span.end()
        context.delivery.reset(self.tokens[1])
        context.scope.reset(self.tokens[0])


class Request:
    """One HTTP request's span (continuing a caller's trace from `traceparent`, e.g. another
    instance's remote call) and, at debug, its line. Named by its route template."""

    __slots__ = ("span", "attached", "started", "status")

    def __init__(self, scope: dict) -> None:
        self.started, self.status, self.span = time.perf_counter(), 0, None
        if TRACING:
            carrier = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in _TRACE_HEADERS}
            attributes = {"http.request.method": scope["method"], "url.path": scope["path"]}
            parent = _propagator.extract(carrier) if carrier else None
            self.span = _tracer.start_span(scope["method"], parent, SpanKind.SERVER, attributes)
            self.attached = otel_context.attach(trace.set_span_in_context(self.span))

    def end(self, scope: dict) -> None:
        route = scope.get("path_template")
        if DEBUG:
            fields = {"method": scope["method"], "route": route, "path": scope["path"], "status": self.status,
                      "seconds": round(time.perf_counter() - self.started, 6)}  # fmt: skip
            http_log.debug("request %s %s %s", scope["method"], scope["path"], self.status, extra={"fields": fields})
        if self.span is not None:
            otel_context.detach(self.attached)
            if route:
                self.span.update_name(f"{scope['method']} {route}")
                self.span.set_attribute("http.route", route)
            self.span.set_attribute("http.response.status_code", self.status)
            if self.status >= 500 or not self.status:
                self.span.set_status(StatusCode.ERROR)
            self.span.end()


_TRACE_HEADERS = (b"traceparent", b"tracestate")
_decode_headers = msgspec.json.Decoder(dict[str, Any]).decode
