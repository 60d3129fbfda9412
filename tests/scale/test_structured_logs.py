"""Structured logs (issue 13), on a real `switchboard serve --log-level debug` with JSON lines: an
order's request id is on its request's lines and on the relay's delivery line of every subscriber
of its flow, each line a JSON object with the fields that say what was being handled."""

from __future__ import annotations

import json
import re
import sys
import uuid
from pathlib import Path

from tests.scale.conftest import (
    ROOT,
    START_TIMEOUT,
    Cluster,
    EmbeddedServer,
    call,
    free_port,
    order_body,
    wait_for,
)

FLOW = {  # subscriber -> the event it is delivered, for a paid order
    "payments.charge_order": {"orders.OrderPlaced"},
    "orders.mark_order_paid": {"payments.PaymentCaptured"},
    "inventory.commit_reservation": {"payments.PaymentCaptured"},
    "notifications.notify_customer": {"payments.PaymentCaptured"},
}


class DebugServer(EmbeddedServer):
    """An EmbeddedServer started with `--log-level debug`."""

    def spawn(self) -> None:
        import subprocess

        command = [sys.executable, "-m", "app", "serve", "--port", str(self.port), "--log-level", "debug"]
        self.starts += 1
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )


def lines_with(path: Path, text: str) -> list[dict]:
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if text in line:
            found.append(json.loads(line))  # every line that names the request is a JSON object
    return found


async def test_an_orders_request_id_is_on_its_request_lines_and_every_delivery_line(cluster: Cluster, tmp_path):
    env = {k: v for k, v in cluster.env().items() if k != "DATABASE_URL"}
    env |= {"SWITCHBOARD_DATA_DIR": str(tmp_path / "data"), "SWITCHBOARD_LOG_FORMAT": "json"}
    server = DebugServer("logs", free_port(), tmp_path / "data", env, cluster.logs / "logs.log")
    cluster.servers.append(server)
    server.spawn()
    await server.wait_ready(cluster.http, timeout=START_TIMEOUT * 2)
    request_id = f"order-{uuid.uuid4().hex}"

    status, _, _ = await call(cluster.http, "POST", f"{server.url}/inventory/items", json_body={"sku": "lamp", "quantity": 3})
    assert status == 201
    status, headers, placed = await call(
        cluster.http, "POST", f"{server.url}/orders", json_body=order_body("lamp", 1, "pm_card_ok"),
        headers={"X-Request-ID": request_id},
    )  # fmt: skip
    assert status == 201 and {k.lower(): v for k, v in headers.items()}["x-request-id"] == request_id, placed

    async def paid():
        status, _, order = await call(cluster.http, "GET", f"{server.url}/orders/{placed['order_id']}")
        return status == 200 and order["status"] == "paid"

    await wait_for(paid, 20, "the order to be paid")

    async def every_delivery_logged():
        lines = lines_with(server.log_path, request_id)
        return {line.get("subscriber") for line in lines if line["event"] == "delivery ok"} >= set(FLOW) and lines

    lines = await wait_for(every_delivery_logged, 20, "a delivery line for every subscriber of the flow")
    for line in lines:
        assert line["correlation_id"] == request_id, line
        assert {"causation_id", "module", "message", "level", "logger", "timestamp"} <= line.keys(), line

    [request] = [line for line in lines if line["logger"] == "app.http"]
    assert (request["method"], request["route"], request["status"], request["level"]) == ("POST", "/orders", 201, "debug")
    calls = {(line["module"], line["message"]) for line in lines if line["logger"] == "app.mediator"}
    assert {("orders", "PlaceOrder"), ("inventory", "ReserveStock")} <= calls
    deliveries = [line for line in lines if line["event"] == "delivery ok"]
    for line in deliveries:
        assert line["module"] == line["subscriber"].split(".")[0], line
        assert line["message"] in FLOW[line["subscriber"]], line
        assert isinstance(line["outbox_id"], int) and line["attempt"] == 1, line
        assert line["outcome"] == "ok" and line["seconds"] >= 0 and line["causation_id"], line
    assert "trace_id" not in lines[0]  # no OTEL_* variable: no tracing
    # nobody else formats the app's records too (litestar's default config adds a root handler)
    plain = [line for line in server.log().splitlines() if re.match(r"(DEBUG|INFO|WARNING|ERROR) - ", line)]
    assert plain == []
