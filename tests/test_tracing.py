"""Tracing (issue 13): one trace per order, from its request through every subscriber, with the
trace context carried by the events' metadata; and no tracing at all when no OTEL_* is set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app import observe

ROOT = Path(__file__).resolve().parent.parent
ORDER = {"customer_id": "c-1", "items": [{"sku": "widget", "quantity": 1}], "payment_method": "pm_card_ok"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, into memory (not the global provider: it can be set only once)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observe.use_tracer(provider)
    try:
        yield exporter
    finally:
        observe.use_tracer(None)
        provider.shutdown()


class Tree:
    def __init__(self, finished: tuple[ReadableSpan, ...]) -> None:
        self.spans = list(finished)
        self.by_id = {s.context.span_id: s for s in self.spans}

    def one(self, name: str) -> ReadableSpan:
        [found] = [s for s in self.spans if s.name == name]
        return found

    def parent(self, span: ReadableSpan) -> ReadableSpan | None:
        return self.by_id.get(span.parent.span_id) if span.parent else None

    def ancestors(self, span: ReadableSpan) -> list[str]:
        names, current = [], self.parent(span)
        while current is not None:
            names.append(current.name)
            current = self.parent(current)
        return names


async def test_one_trace_follows_an_order_from_its_request_through_every_subscriber(client, app_relay, spans):
    await client.post("/inventory/items", json={"sku": "widget", "quantity": 5})
    spans.clear()
    placed = await client.post("/orders", json=ORDER, headers={"X-Request-ID": "traced-order"})
    assert placed.status_code == 201, placed.text

    await app_relay.drain()

    tree = Tree(spans.get_finished_spans())
    request = tree.one("POST /orders")
    assert request.kind is trace.SpanKind.SERVER and request.parent is None
    assert {s.context.trace_id for s in tree.spans if s.name != "relay claim"} == {request.context.trace_id}
    place = tree.one("PlaceOrder")
    reserve = tree.one("ReserveStock")
    assert tree.parent(place) is request and tree.parent(reserve) is place
    assert dict(reserve.attributes) == {
        "switchboard.module": "inventory", "switchboard.message": "ReserveStock", "switchboard.outcome": "ok"
    }  # fmt: skip
    commits = [s for s in tree.spans if s.name == "commit" and tree.parent(s) in (place, reserve)]
    assert len(commits) == 2  # inventory's StockReserved inside ReserveStock, then OrderPlaced
    charge = tree.one("payments.charge_order")
    assert tree.parent(charge).name == "commit" and tree.parent(tree.parent(charge)) is place
    assert charge.kind is trace.SpanKind.CONSUMER
    assert charge.attributes["switchboard.outcome"] == "ok" and charge.attributes["switchboard.attempt"] == 1
    for subscriber in ("orders.mark_order_paid", "notifications.notify_customer", "inventory.commit_reservation"):
        assert "payments.charge_order" in tree.ancestors(tree.one(subscriber)), subscriber
    for subscriber in ("orders.mark_order_paid", "notifications.notify_customer"):
        assert tree.ancestors(tree.one(subscriber))[-2:] == ["PlaceOrder", "POST /orders"], subscriber
    claims = [s for s in tree.spans if s.name == "relay claim"]
    assert claims and any(link.context.trace_id == request.context.trace_id for c in claims for link in c.links)


async def test_events_carry_the_span_that_recorded_them_in_their_metadata(client, app_relay, spans):
    await client.post("/inventory/items", json={"sku": "widget", "quantity": 5})
    spans.clear()
    placed = (await client.post("/orders", json=ORDER)).json()

    row = await client.app.state.system.db.fetchrow(
        "SELECT metadata FROM events WHERE stream_id = $1", f"order-{placed['order_id']}"
    )
    version, trace_id, span_id, flags = json.loads(row["metadata"])["traceparent"].split("-")
    commit = next(s for s in spans.get_finished_spans() if s.context.span_id == int(span_id, 16))
    assert (version, int(flags, 16) & 1, commit.name) == ("00", 1, "commit")  # sampled
    assert int(trace_id, 16) == commit.context.trace_id


async def test_without_otel_variables_the_app_traces_nothing_and_runs_no_exporter(client, app_relay):
    assert not [name for name in os.environ if name.startswith("OTEL_")]  # the suite runs with none
    await client.post("/inventory/items", json={"sku": "widget", "quantity": 5})
    placed = (await client.post("/orders", json=ORDER)).json()
    await app_relay.drain()

    assert observe.TRACING is False
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("OtelBatch")]
    row = await client.app.state.system.db.fetchrow(
        "SELECT metadata FROM events WHERE stream_id = $1", f"order-{placed['order_id']}"
    )
    assert "traceparent" not in json.loads(row["metadata"])


def tracing_in_a_fresh_process(**otel: str) -> dict:
    code = (
        "import json, threading; from opentelemetry import trace; from app import observe\n"
        "on = observe.setup_tracing()\n"
        "print(json.dumps({'on': on, 'provider': type(trace.get_tracer_provider()).__name__,"
        " 'threads': [t.name for t in threading.enumerate() if t.name.startswith('OtelBatch')],"
        # the SDK keeps them privately: BatchSpanProcessor._batch_processor._exporter
        " 'exporters': [type(e).__module__ + '.' + type(e).__name__"
        "   for p in getattr(getattr(trace.get_tracer_provider(), '_active_span_processor', None),"
        "   '_span_processors', ()) for e in [p._batch_processor._exporter]],"
        " 'service': getattr(trace.get_tracer_provider(), 'resource', None) and"
        "   trace.get_tracer_provider().resource.attributes.get('service.name')}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | otel
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_otel_variable_means_no_provider_and_no_exporter_thread():
    assert tracing_in_a_fresh_process() == {
        "on": False, "provider": "ProxyTracerProvider", "threads": [], "exporters": [], "service": None
    }  # fmt: skip


def test_otel_variables_pick_the_exporter_by_protocol_and_name_the_service():
    http = tracing_in_a_fresh_process(OTEL_SERVICE_NAME="orders-eu", OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    grpc = tracing_in_a_fresh_process(OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    none = tracing_in_a_fresh_process(OTEL_TRACES_EXPORTER="none", OTEL_SERVICE_NAME="x")
    assert (http["on"], http["provider"], http["service"]) == (True, "TracerProvider", "orders-eu")
    assert http["exporters"] == ["opentelemetry.exporter.otlp.proto.http.trace_exporter.OTLPSpanExporter"]
    assert http["threads"]
    assert grpc["exporters"] == ["opentelemetry.exporter.otlp.proto.grpc.trace_exporter.OTLPSpanExporter"]
    assert grpc["service"] == "switchboard"
    assert none == {"on": False, "provider": "ProxyTracerProvider", "threads": [], "exporters": [], "service": None}


def serve(**env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "app", "serve", "--port", "1"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SWITCHBOARD_"))} | env
    return subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "switchboard: OTEL_TRACES_EXPORTER='zipkin' is not otlp, console or none"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
         "switchboard: OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not http/protobuf or grpc"),
        ({"SWITCHBOARD_LOG_LEVEL": "loud"},
         "switchboard: SWITCHBOARD_LOG_LEVEL='loud' is not one of debug, info, warning, error, critical"),
        ({"SWITCHBOARD_LOG_FORMAT": "xml"}, "switchboard: SWITCHBOARD_LOG_FORMAT='xml' is not json, console or auto"),
    ],
)  # fmt: skip
def test_serve_refuses_a_bad_log_or_tracing_variable_in_one_line(env, line):
    done = serve(**env)
    assert (done.returncode, done.stderr.strip()) == (2, line)
