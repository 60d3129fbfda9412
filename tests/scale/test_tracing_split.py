"""One trace across a split deployment (issue 13): process A (orders, payments, notifications)
reaches inventory on B over HTTP with a W3C traceparent, and B's relay continues the trace from
the events' metadata. Both export over OTLP/HTTP to a stand-in collector in the test."""

from __future__ import annotations

import asyncio
import uuid

from tests.scale.conftest import Cluster, call, order_body, wait_for
from tests.scale.otlp import Collector, ReceivedSpan
from tests.scale.test_split_deployment import A_MODULES, wait_order


def tracing_env(collector: Collector, service: str) -> dict[str, str]:
    return {
        "OTEL_SERVICE_NAME": service,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export every 100 ms, not every 5 s
    }


async def test_one_trace_spans_both_processes_through_the_remote_call_and_both_relays(cluster: Cluster):
    collector = await Collector().start()
    try:
        b, a = await asyncio.gather(
            cluster.start("B-inventory", modules="inventory", env=tracing_env(collector, "switchboard-b")),
            cluster.start("A-orders", modules=A_MODULES, env=tracing_env(collector, "switchboard-a")),
        )
        status, _, _ = await call(cluster.http, "POST", f"{b.url}/inventory/items", json_body={"sku": "kettle", "quantity": 4})
        assert status == 201
        status, _, placed = await call(
            cluster.http, "POST", f"{a.url}/orders", json_body=order_body("kettle", 1, "pm_card_ok"),
            headers={"X-Request-ID": f"split-{uuid.uuid4().hex}"},
        )  # fmt: skip
        assert status == 201, placed
        await wait_order(cluster, a, placed["order_id"], "paid")

        def trace_of_order() -> list[ReceivedSpan]:
            [root] = [s for s in collector.spans if s.name == "POST /orders"] or [None]
            return [s for s in collector.spans if root and s.trace_id == root.trace_id]

        async def whole_flow_exported():
            names = {s.name for s in trace_of_order()}
            return {"inventory.commit_reservation", "notifications.notify_customer", "orders.mark_order_paid"} <= names

        await wait_for(whole_flow_exported, 20, "the order's spans from both processes")
    finally:
        await collector.close()

    spans = trace_of_order()
    by_id = {s.span_id: s for s in spans}

    def one(name: str, service: str) -> ReceivedSpan:
        found = [s for s in spans if s.name == name and s.service == service]
        assert len(found) == 1, (name, service, sorted(s.name for s in spans if s.service == service))
        return found[0]

    def parent(span: ReceivedSpan) -> ReceivedSpan:
        return by_id[span.parent_id]

    def ancestors(span: ReceivedSpan) -> list[tuple[str, str]]:
        chain = []
        while span.parent_id:
            span = parent(span)
            chain.append((span.service, span.name))
        return chain

    request = one("POST /orders", "switchboard-a")
    assert request.parent_id == ""
    place = one("PlaceOrder", "switchboard-a")
    assert parent(place) is request
    # A: the mediator's ReserveStock call goes out as a remote call; B: the internal request continues it
    reserve_a = one("ReserveStock", "switchboard-a")
    remote = one("remote inventory.ReserveStock", "switchboard-a")
    received = one("POST /internal/messages/{name}", "switchboard-b")
    reserve_b = one("ReserveStock", "switchboard-b")
    assert (parent(reserve_a), parent(remote), parent(received), parent(reserve_b)) == (place, reserve_a, remote, received)
    assert reserve_b.attributes["switchboard.module"] == "inventory"
    assert parent(one("commit", "switchboard-b")) is reserve_b
    # the relays: A charges, B commits the reservation, each parented on the event's recording span
    charge = one("payments.charge_order", "switchboard-a")
    assert ancestors(charge)[-2:] == [("switchboard-a", "PlaceOrder"), ("switchboard-a", "POST /orders")]
    committed = one("inventory.commit_reservation", "switchboard-b")
    assert ("switchboard-a", "payments.charge_order") in ancestors(committed)
    for name in ("orders.mark_order_paid", "notifications.notify_customer"):
        assert ("switchboard-a", "payments.charge_order") in ancestors(one(name, "switchboard-a")), name
