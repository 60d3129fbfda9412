"""Tracing cost: this process's CPU per order with tracing off and on, in the same run.

    uv run python -m bench.tracing_cost [--orders 2000] [--concurrency 32] [--rounds 3]

A fresh database (embedded PostgreSQL in a temporary folder, or DATABASE_URL's server), 1,000 SKUs
seeded as in P1. Each round, tracing off then on (alternating, so drift on a noisy machine hits
both), after unmeasured warm-up orders:
- `orders`: `--orders` times `mediator.send(PlaceOrder(...))` as bench/inprocess.py does (spans:
  PlaceOrder, ReserveStock, two commits), `--concurrency` at a time;
- `relay`: then `Relay(system).drain()` of everything those orders published (the whole flow:
  charge, mark paid, notify, commit reservation, read models; a span per delivery and claim).
"On" is the SDK's TracerProvider with a BatchSpanProcessor exporting over OTLP/HTTP protobuf to a
stand-in collector in another process (an aiohttp server that accepts and discards /v1/traces),
flushed before each measurement ends, so the exporter thread's CPU is counted. CPU is this
process's (all threads: user + system) per order. One JSON line per phase, mode and round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from app import observe
from app.bootstrap import bootstrap
from app.db import Database
from app.relay import Relay
from app.settings import Settings
from bench import env
from modules.orders.commands import OrderLine, PlaceOrder

WARM_UP_ORDERS = 300


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def collector(port: int) -> None:
    """The stand-in collector: accepts and discards OTLP/HTTP exports."""
    from aiohttp import web

    async def discard(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", discard)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def tracer_provider(endpoint: str):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces")))
    return provider


async def measure(server: env.DatabaseServer, endpoint: str, orders: int, concurrency: int, rounds: int) -> list:
    url = await server.fresh("bench_tracing")
    skus = env.sku_names(1000)
    await env.seed_stock(url, skus, 1_000_000_000)
    settings = replace(Settings(), database_url=url, instance_id="bench-tracing")
    db = await Database(url, max_size=settings.db_pool_size).connect()
    provider = tracer_provider(endpoint)
    try:
        system = bootstrap(settings, db)
        relay = Relay(system, instance_id="bench-tracing")
        limit = asyncio.Semaphore(concurrency)

        async def place() -> None:
            async with limit:
                line = OrderLine(sku=random.choice(skus), quantity=1)
                await system.mediator.send(PlaceOrder(customer_id="c", lines=(line,), payment_method="pm_card_ok"))

        results = []
        for round_number in range(1, rounds + 1):
            for mode in ("off", "on"):
                observe.use_tracer(provider if mode == "on" else None)
                await asyncio.gather(*(place() for _ in range(WARM_UP_ORDERS)))
                await relay.drain()
                await asyncio.to_thread(provider.force_flush)
                for phase in ("orders", "relay"):
                    cpu0, t0 = _own_cpu(), time.perf_counter()
                    if phase == "orders":
                        await asyncio.gather(*(place() for _ in range(orders)))
                    else:
                        await relay.drain()
                    if mode == "on":
                        await asyncio.to_thread(provider.force_flush)  # its export counted in this phase
                    wall, cpu = time.perf_counter() - t0, _own_cpu() - cpu0
                    results.append({
                        "measurement": "tracing_cost", "phase": phase, "tracing": mode, "round": round_number,
                        "orders": orders, "seconds": round(wall, 3),
                        "cpu_ms_per_order": round(cpu / orders * 1000, 3),
                    })  # fmt: skip
                    print(json.dumps(results[-1]), flush=True)
        observe.use_tracer(None)
        return results
    finally:
        provider.shutdown()
        await db.close()


async def main(args: argparse.Namespace, port: int) -> None:
    deadline = time.monotonic() + 20
    while True:  # until the collector listens
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp:
        server = env.DatabaseServer(Path(tmp), os.environ.get("DATABASE_URL"))
        try:
            await measure(server, f"http://127.0.0.1:{port}", args.orders, args.concurrency, args.rounds)
        finally:
            await server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--collector", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.collector:
        collector(arguments.collector)
    else:
        import uvloop

        port = _free_port()
        stand_in = subprocess.Popen([sys.executable, "-m", "bench.tracing_cost", "--collector", str(port)])
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main(arguments, port))
        finally:
            stand_in.terminate()
            stand_in.wait(10)
