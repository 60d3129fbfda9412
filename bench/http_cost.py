"""The HTTP edge's own CPU per `POST /orders`, in process: switchboard's app (its middlewares, its
strict JSON request, the controller, the mediator) against a bare litestar handler doing the
baseline's HTTP work (bench/baseline.py's `place` without its SQL), both driven through their ASGI
callables with the same request. The order handler is stubbed: no database, no granian, so what
is left is the per-request cost each app adds around the same answer.

    uv run --group bench python -m bench.http_cost [--requests 20000] [--concurrency 32] [--rounds 3]

One JSON line per app and round: µs of this process's CPU per request. The apps alternate, so
drift on a noisy machine hits both."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

from litestar import Litestar, Response, post

from app.main import create_app
from app.mediator import Mediator
from app.settings import Settings
from bench import baseline
from modules.orders.commands import OrderAccepted, PlaceOrder

BODY = b'{"customer_id":"c-1","items":[{"sku":"sku-0001","quantity":1}],"payment_method":"pm_card_ok"}'
PLACED_AT = datetime.now(UTC)


def scope() -> dict:
    """What granian hands the app for one request of bench/p1.py's generator."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": "/orders",
        "raw_path": b"/orders",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
        "state": {},
    }


async def receive() -> dict:
    return {"type": "http.request", "body": BODY, "more_body": False}


def switchboard_app() -> Litestar:
    async def place_order(cmd: PlaceOrder) -> OrderAccepted:
        return OrderAccepted(order_id=uuid.uuid4(), position=1, placed_at=PLACED_AT)

    app = create_app(Settings(), run_relay=False)
    mediator = Mediator({PlaceOrder: ("orders", place_order)})
    app.state.runtime.system = SimpleNamespace(mediator=mediator, db=None)
    app.state.system = app.state.runtime.system
    return app


def baseline_app() -> Litestar:
    @post("/orders", status_code=201)
    async def place(data: baseline.PlaceOrderRequest) -> Response:
        order_id, position = uuid.uuid4(), 1
        body = baseline.OrderPlacedResponse(
            order_id=order_id,
            status="placed",
            customer_id=data.customer_id,
            items=[baseline.Line(i.sku, i.quantity) for i in data.items],
            payment_method=data.payment_method,
            position=position,
            placed_at=PLACED_AT,
        )
        return Response(
            body,
            status_code=201,
            headers={"Location": f"/orders/{order_id}", "X-Switchboard-Position": str(position)},
        )

    return Litestar(route_handlers=[place], openapi_config=None)


async def run(app, requests: int, concurrency: int) -> float:
    statuses: list[int] = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def worker(n: int) -> None:
        for _ in range(n):
            await app(scope(), receive, send)

    cpu = time.process_time()
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    cpu = time.process_time() - cpu
    bad = [s for s in statuses if s != 201]
    if bad:
        raise SystemExit(f"unexpected statuses: {sorted(set(bad))}")
    return cpu / len(statuses) * 1e6


async def main(args: argparse.Namespace) -> None:
    apps = {"switchboard": switchboard_app(), "baseline": baseline_app()}
    results: dict[str, list[float]] = {name: [] for name in apps}
    for app in apps.values():
        await run(app, 2000, args.concurrency)  # warm-up
    for round_number in range(1, args.rounds + 1):
        for name, app in apps.items():
            us = await run(app, args.requests, args.concurrency)
            results[name].append(us)
            line = {"measurement": "http_cost", "app": name, "round": round_number, "us_per_request": round(us, 1)}
            print(json.dumps(line), flush=True)
    medians = {name: round(statistics.median(v), 1) for name, v in results.items()}
    least = {f"{name}_min": round(min(v), 1) for name, v in results.items()}  # the least disturbed round
    print(json.dumps({"measurement": "http_cost_median", **medians, **least,
                      "extra_us": round(medians["switchboard"] - medians["baseline"], 1)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(parser.parse_args()))
