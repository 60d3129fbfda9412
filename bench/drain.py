"""The order flow's cost, split into its two halves, without HTTP: how fast the request path alone
places orders, and how fast the relay alone then delivers everything those orders cause.

    uv run --group bench python -m bench.drain [--orders 5000] [--concurrency 32]

1. A fresh database (embedded PostgreSQL in a temporary folder, or DATABASE_URL's server), 1,000
   SKUs seeded as in P1.
2. **Place**: `--orders` PlaceOrder through the mediator in this process (`--concurrency` at a time;
   one unit of a random SKU, `pm_card_ok`), no relay running: orders/s and the CPU per order of
   this process and of PostgreSQL.
3. **Drain**: a `Relay` with production defaults (or the SWITCHBOARD_* settings set) starts and
   delivers until no outbox row is left pending — the deliveries per order (DELIVERIES_PER_ORDER,
   from the wiring) and the rows they cause in turn: deliveries/s, the order rate that is
   (deliveries/s / DELIVERIES_PER_ORDER), and the CPU per order again.

Each half also reports the WAL it wrote per order (`wal_bytes_per_order`, from the server's
insert position: the whole server's WAL, so run it alone) and, where the server has the
`pg_walinspect` extension (the embedded one does), the record types that make it up
(`wal_records_per_order`: bytes and records per order by resource manager/record type). WAL is
what every durable commit waits to flush, so it is what a commit-bound step runs out of.

With `--statements`, pg_stat_statements (the embedded server is restarted with it preloaded)
records the drain half alone, and a third JSON line (`drain_statements`) lists its top statements
by total execution time: calls, total and mean ms, ms and calls per order, rows, WAL bytes per
order; a readable table of the same goes to stderr. Tracking costs a little CPU of its own, so
compare CPU figures only between runs with the same flag. `--pg NAME=VALUE` (repeatable) runs the
embedded server with that setting, to measure one (commit_delay, wal_writer_delay, wal_buffers).

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
import sys
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


async def measure(
    server: env.DatabaseServer, orders: int, concurrency: int, statements: int = 0, pg: dict | None = None
) -> list[dict]:
    server_settings = await server.configure(pg or {})
    if statements and not await server.track_statements():
        print("bench.drain: the server does not preload pg_stat_statements: no statement profile", flush=True)
        statements = 0
    url = await server.fresh("bench_drain")
    skus = env.sku_names(1000)
    await env.seed_stock(url, skus, 1_000_000_000)
    settings = replace(Settings.from_env(), database_url=url, instance_id="bench-drain")  # SWITCHBOARD_* apply
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

        # Statistics as a running system has them: autovacuum analyzes a table that grew by 10%
        # within a minute, but the place half filled these ones seconds ago, and a plan made on
        # an empty table (inventory's commit of a hold scanned every hold) would be measured.
        await db.execute("ANALYZE")
        relay = Relay(system)
        if statements:
            await db.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await db.execute("SELECT pg_stat_statements_reset()")
        pg0, cpu0, t0 = env.tree_cpu(roots), _own_cpu(), time.perf_counter()
        relay.start()
        await _drained(relay, db)
        wall = time.perf_counter() - t0
        pg = env.tree_cpu(roots)
        await relay.stop()
        record = _record("drain_relay", orders, relay.delivered, wall, _own_cpu() - cpu0, pg, pg0)
        record.update(await _wal(db, lsn1, await _lsn(db), orders, walinspect))
        record["orders_per_s"] = round(relay.delivered / DELIVERIES_PER_ORDER / wall, 1)
        record["dead_letters"] = await db.fetchval("SELECT count(*) FROM dead_letters")
        if server_settings:
            record["server_settings"] = server_settings
        results.append(record)
        if statements:
            results.append(await _statements(db, orders, statements))
        return results
    finally:
        await db.close()


async def _drained(relay: Relay, db: Database) -> None:
    """Until no outbox row is pending. The database is asked only once the relay delivered
    nothing for a tenth of a second: polling it all along (a count of the pending rows, ten times
    a second) was a tenth of the database's CPU in the half this measures."""
    seen = -1
    while True:
        await asyncio.sleep(0.1)
        if relay.delivered != seen:
            seen = relay.delivered
        elif not await db.fetchval("SELECT EXISTS (SELECT FROM outbox WHERE status = 'pending')"):
            return


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


STATEMENTS_SQL = """
SELECT query, calls, total_exec_time, rows, wal_bytes
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query NOT LIKE '%pg_stat_statements%'
ORDER BY total_exec_time DESC
LIMIT $1
"""


async def _statements(db: Database, orders: int, top: int) -> dict:
    """The drain half's top statements by total execution time (the relay's, and the bench's own
    poll for pending rows, which is listed so its share is visible)."""
    rows = await db.fetch(STATEMENTS_SQL, top)
    listed = [
        {
            "query": " ".join(r["query"].split())[:160],
            "calls": r["calls"],
            "total_ms": round(r["total_exec_time"], 1),
            "mean_ms": round(r["total_exec_time"] / r["calls"], 4),
            "ms_per_order": round(r["total_exec_time"] / orders, 4),
            "calls_per_order": round(r["calls"] / orders, 2),
            "rows": r["rows"],
            "wal_bytes_per_order": round(float(r["wal_bytes"]) / orders),
        }
        for r in rows
    ]
    print(f"{'total ms':>9} {'calls':>7} {'mean ms':>8} {'ms/order':>8} {'WAL B/order':>11}  query", file=sys.stderr)
    for s in listed:
        print(
            f"{s['total_ms']:>9} {s['calls']:>7} {s['mean_ms']:>8} {s['ms_per_order']:>8} "
            f"{s['wal_bytes_per_order']:>11}  {s['query'][:100]}",
            file=sys.stderr,
        )
    return {"measurement": "drain_statements", "orders": orders, "statements": listed}


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
            for record in await measure(server, args.orders, args.concurrency, args.statements, dict(args.pg)):
                print(json.dumps(record), flush=True)
        finally:
            await server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--orders", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--statements", type=int, nargs="?", const=15, default=0, metavar="TOP",
        help="profile the drain half with pg_stat_statements: its TOP (15) statements by total time",
    )
    parser.add_argument(
        "--pg", type=lambda text: tuple(text.split("=", 1)), action="append", default=[], metavar="NAME=VALUE",
        help="a setting of the embedded server for this run (ALTER SYSTEM; restarted if needed), repeatable",
    )
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(parser.parse_args()))
