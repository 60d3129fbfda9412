"""The order flow's cost, split into its two halves, without HTTP: how fast the request path alone
places orders, and how fast the relay alone then delivers everything those orders cause.

    uv run --group bench python -m bench.drain [--orders 5000] [--concurrency 32]

1. A fresh database (embedded PostgreSQL in a temporary folder, or DATABASE_URL's server), 1,000
   SKUs seeded as in P1.
2. **Place**: `--orders` PlaceOrder through the mediator in this process (`--concurrency` at a time;
   one unit of a random SKU, `pm_card_ok`), no relay running: orders/s and the CPU per order of
   this process and of PostgreSQL.
3. **Drain**: a `Relay` with production defaults starts and delivers until no outbox row is left
   pending — the deliveries per order (DELIVERIES_PER_ORDER, from the wiring: 4) and the rows
   they cause in turn: deliveries/s, the order rate that is (deliveries/s / DELIVERIES_PER_ORDER),
   and the CPU per order again.

Each half also reports the WAL it wrote per order (`wal_bytes_per_order`, from the server's
insert position: the whole server's WAL, so run it alone) and, where the server has the
`pg_walinspect` extension (the embedded one does), the record types that make it up
(`wal_records_per_order`: bytes and records per order by resource manager/record type). WAL is
what every durable commit waits to flush, so it is what a commit-bound step runs out of.

One JSON line per half. What it answers: the CPU one order costs on each side, so how many
orders/s the whole flow can sustain on this machine when both halves share it (P1's "capacity"
only needs the request path to keep up during a step; the async side may fall behind — this says
by how much it must).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from app.bootstrap import bootstrap
from app.db import Database
from app.relay import Relay
from app.settings import Settings
from bench import env
from bench.sustained import rows_per_order
from modules.orders.commands import OrderLine, PlaceOrder

# Counted from the wiring (bench/sustained.py), so the figure follows it (an inline projection is none).
DELIVERIES_PER_ORDER = rows_per_order()


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(server: env.DatabaseServer, orders: int, concurrency: int) -> list[dict]:
    url = await server.fresh("bench_drain")
    skus = env.sku_names(1000)
    await env.seed_stock(url, skus, 1_000_000_000)
    settings = replace(Settings(), database_url=url, instance_id="bench-drain")
    db = await Database(url, max_size=settings.db_pool_size).connect()
    roots = {"postgres": server.postmaster_pid}
    try:
        system = bootstrap(settings, db)
        limit = asyncio.Semaphore(concurrency)

        async def place() -> None:
            async with limit:
                line = OrderLine(sku=random.choice(skus), quantity=1)
                await system.mediator.send(
                    PlaceOrder(customer_id="c", lines=(line,), payment_method="pm_card_ok")
                )

        results = []
        walinspect = await _walinspect(db)
        lsn0 = await _lsn(db)
        pg0, cpu0, t0 = env.tree_cpu(roots), _own_cpu(), time.perf_counter()
        await asyncio.gather(*(place() for _ in range(orders)))
        wall = time.perf_counter() - t0
        pg = env.tree_cpu(roots)
        results.append(_record("drain_place", orders, orders, wall, _own_cpu() - cpu0, pg, pg0))
        lsn1 = await _lsn(db)
        results[-1].update(await _wal(db, lsn0, lsn1, orders, walinspect))

        relay = Relay(system)
        pg0, cpu0, t0 = env.tree_cpu(roots), _own_cpu(), time.perf_counter()
        relay.start()
        while await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'pending'"):  # noqa: ASYNC110 (polls the database)
            await asyncio.sleep(0.1)
        wall = time.perf_counter() - t0
        pg = env.tree_cpu(roots)
        await relay.stop()
        record = _record("drain_relay", orders, relay.delivered, wall, _own_cpu() - cpu0, pg, pg0)
        record.update(await _wal(db, lsn1, await _lsn(db), orders, walinspect))
        record["orders_per_s"] = round(relay.delivered / DELIVERIES_PER_ORDER / wall, 1)
        record["dead_letters"] = await db.fetchval("SELECT count(*) FROM dead_letters")
        results.append(record)
        return results
    finally:
        await db.close()


async def _lsn(db: Database) -> str:
    return await db.fetchval("SELECT pg_current_wal_insert_lsn()::text")


async def _walinspect(db: Database) -> bool:
    try:
        await db.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        return True
    except Exception as error:  # not installed on that server, or no privilege: bytes only
        print(f"bench.drain: no WAL record breakdown ({error})", flush=True)
        return False


async def _wal(db: Database, start: str, end: str, orders: int, walinspect: bool) -> dict:
    size = await db.fetchval("SELECT pg_wal_lsn_diff($2::text::pg_lsn, $1::text::pg_lsn)", start, end)
    out: dict = {"wal_bytes_per_order": round(float(size) / orders)}
    if walinspect and size > 0:
        # pg_walinspect reads flushed WAL only, and the relay's commits do not wait for the flush
        # (the WAL writer flushes them within wal_writer_delay): wait until it has.
        deadline = time.monotonic() + 10
        while not await db.fetchval("SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn", end):
            if time.monotonic() > deadline:
                raise TimeoutError(f"WAL not flushed up to {end} after 10 s")
            await asyncio.sleep(0.02)  # noqa: ASYNC110 (polls the database)
        rows = await db.fetch(
            'SELECT "resource_manager/record_type" AS kind, count, combined_size'
            " FROM pg_get_wal_stats($1::text::pg_lsn, $2::text::pg_lsn, true)"
            " WHERE count > 0 ORDER BY combined_size DESC LIMIT 12",
            start,
            end,
        )
        out["wal_records_per_order"] = {
            r["kind"]: {"bytes": round(r["combined_size"] / orders), "records": round(r["count"] / orders, 1)}
            for r in rows
        }
    return out


def _record(name: str, orders: int, items: int, wall: float, cpu: float, pg: dict, pg0: dict) -> dict:
    pg_cpu = pg.get("postgres", 0.0) - pg0.get("postgres", 0.0) if "postgres" in pg0 else None
    return {
        "measurement": name,
        "orders": orders,
        "items": items,  # orders placed, or deliveries made
        "seconds": round(wall, 3),
        "items_per_s": round(items / wall, 1),
        "cpu_bench_process": round(cpu / wall, 3),
        "cpu_postgres": None if pg_cpu is None else round(pg_cpu / wall, 3),
        "bench_cpu_ms_per_order": round(cpu / orders * 1000, 3),
        "postgres_cpu_ms_per_order": None if pg_cpu is None else round(pg_cpu / orders * 1000, 3),
    }


async def main(args: argparse.Namespace) -> None:
    import os

    with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        server = env.DatabaseServer(Path(tmp), os.environ.get("DATABASE_URL"))
        try:
            for record in await measure(server, args.orders, args.concurrency):
                print(json.dumps(record), flush=True)
        finally:
            await server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--orders", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(parser.parse_args()))
