"""The request path of `POST /orders` without HTTP, switchboard against the baseline, in one process
on one database: the client CPU each spends per order.

    uv run --group bench python -m bench.inprocess [--orders 3000] [--concurrency 32] [--rounds 2]

1. A fresh database (embedded PostgreSQL in a temporary folder, or DATABASE_URL's server), 1,000
   SKUs seeded as in P1.
2. Each round, for each app, after 300 unmeasured orders: `--orders` orders, `--concurrency` at a
   time (one unit of a random SKU):
   - switchboard: `mediator.send(PlaceOrder(...))` with the app's mediator, unit of work and
     modules (no relay running);
   - baseline: `bench/baseline.py`'s own functions (`_reserve`, then its `PLACE_SQL`) on an
     asyncpg pool set up as the baseline app's.
   The apps alternate, so drift on this noisy machine hits both.

One JSON line per app and round: orders/s and this process's CPU per order. What it answers:
how much of the worker's CPU per request is switchboard's own request path (the mediator, the
unit of work, the aggregates, its statements) rather than HTTP, which both apps share. P1 at
10,000 connections is bounded by that worker's one core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import asyncpg

from app.bootstrap import bootstrap
from app.db import Database
from app.settings import Settings
from bench import baseline, env
from modules.orders.commands import OrderLine, PlaceOrder

WARM_UP_ORDERS = 300


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(server: env.DatabaseServer, orders: int, concurrency: int, rounds: int) -> list[dict]:
    url = await server.fresh("bench_inprocess")
    skus = env.sku_names(1000)
    await env.seed_stock(url, skus, 1_000_000_000)
    settings = replace(Settings(), database_url=url, instance_id="bench-inprocess")
    db = await Database(url, max_size=settings.db_pool_size).connect()
    pool = await asyncpg.create_pool(  # as the baseline app's lifespan makes it
        url, min_size=2, max_size=baseline.POOL_SIZE, command_timeout=30, reset=baseline._keep_session
    )
    try:
        system = bootstrap(settings, db)
        limit = asyncio.Semaphore(concurrency)
        subscribers = list(baseline.ORDER_PLACED_SUBSCRIBERS)

        async def switchboard() -> None:
            async with limit:
                line = OrderLine(sku=random.choice(skus), quantity=1)
                await system.mediator.send(
                    PlaceOrder(customer_id="c", lines=(line,), payment_method="pm_card_ok")
                )

        async def hand_written() -> None:
            async with limit:
                order_id, sku = uuid.uuid4(), random.choice(skus)
                metadata = baseline._encode(
                    {"correlation_id": uuid.uuid4().hex, "causation_id": None}
                ).decode()
                await baseline._reserve(pool, order_id, {sku: 1}, metadata)
                payload = baseline._encode(
                    {
                        "type": "orders.OrderPlaced",
                        "order_id": str(order_id),
                        "customer_id": "c",
                        "lines": [{"sku": sku, "quantity": 1}],
                        "payment_method": "pm_card_ok",
                    }
                ).decode()
                async with pool.acquire() as conn:
                    await conn.fetchrow(
                        baseline.PLACE_SQL, uuid.uuid4(), f"order-{order_id}", payload, metadata, subscribers,
                        order_id, "c", baseline._encode([{"sku": sku, "quantity": 1}]).decode(), "pm_card_ok",
                        datetime.now().astimezone(),
                    )  # fmt: skip

        results = []
        for round_number in range(1, rounds + 1):
            for app, place in (("switchboard", switchboard), ("baseline", hand_written)):
                await asyncio.gather(*(place() for _ in range(WARM_UP_ORDERS)))
                cpu0, t0 = _own_cpu(), time.perf_counter()
                await asyncio.gather(*(place() for _ in range(orders)))
                wall, cpu = time.perf_counter() - t0, _own_cpu() - cpu0
                results.append(
                    {
                        "measurement": "inprocess_request_path",
                        "app": app,
                        "round": round_number,
                        "orders": orders,
                        "concurrency": concurrency,
                        "seconds": round(wall, 3),
                        "orders_per_s": round(orders / wall, 1),
                        "cpu_ms_per_order": round(cpu / orders * 1000, 3),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
        return results
    finally:
        await pool.close()
        await db.close()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-inprocess-") as tmp:
        server = env.DatabaseServer(Path(tmp), os.environ.get("DATABASE_URL"))
        try:
            await measure(server, args.orders, args.concurrency, args.rounds)
        finally:
            await server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--orders", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(parser.parse_args()))
