"""Sustained: the whole order flow (requests and every delivery they cause) at climbing offered
rates, judged by issue 14's criterion: p99 < 200 ms, 0 errors, every request answered, and at the
end of the step at most one second's worth of undelivered outbox rows (rate x rows per order).

Switchboard as in production: `switchboard serve`, its relay and background tasks in the process,
a fresh database seeded like P1's. The ladder is P1's (bench/p1.py `run_ladder`: open loop, a
failed rate tried once more after the server went quiet, the first failure ends it), except that
each step starts once the previous one's outbox rows are delivered, and there is no step between
the last pass and the failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import replace

import asyncpg

from app.db import with_database
from bench import env
from bench.p1 import P1Config, capacity, run_target

# The events one order with a card that captures causes, in order (bench/README.md, P1). The
# outbox rows they fan out to are counted from the modules' subscriptions, so a subscription
# added or removed changes the criterion by itself; `measured_rows_per_order` cross-checks the
# list against what the database holds after the ladder.
HAPPY_PATH_EVENTS = (
    "inventory.StockReserved",
    "orders.OrderPlaced",
    "payments.PaymentCaptured",
    "orders.OrderPaid",
    "inventory.ReservationCommitted",
)


def rows_per_order(modules: Iterable | None = None, events: Iterable[str] = HAPPY_PATH_EVENTS) -> int:
    """Outbox rows one happy-path order writes: one per (event, subscriber) of its events."""
    if modules is None:
        from app.bootstrap import load_modules

        modules = load_modules()
    wanted = set(events)
    return sum(
        len(subs) for m in modules for event, subs in m.subscriptions.items() if event.topic() in wanted
    )


# Rows the outbox took in, not rows it holds: delivered rows are deleted on acknowledgement by
# default (SWITCHBOARD_OUTBOX_RETENTION=0). The database is fresh, so its counter started at zero;
# it counts rolled-back inserts too (a transaction that wrote its rows, then conflicted or lost
# its lease), so under contention it reads high, never low.
MEASURED_SQL = """
SELECT (SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'outbox') AS rows,
       (SELECT count(*) FROM events WHERE type = 'orders.OrderPlaced') AS orders,
       (SELECT count(*) FROM outbox WHERE status <> 'delivered') AS undelivered
"""
# A backend reports its counters when it exits at the latest: wait for the server's to be gone.
OTHER_BACKENDS_SQL = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"


async def measured_rows_per_order(url: str, timeout: float = 30.0) -> dict:
    """Outbox rows per order in a fresh database that only P1-style orders went into, read after
    the server stopped: meaningful once nothing is undelivered."""
    conn = await asyncpg.connect(url)
    try:
        try:
            async with asyncio.timeout(timeout):
                # another process's backends: no event to await, so poll
                while await conn.fetchval(OTHER_BACKENDS_SQL):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise RuntimeError(f"the server's connections to the database were still open {timeout:g} s after it stopped") from None
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        row = await conn.fetchrow(MEASURED_SQL)
    finally:
        await conn.close()
    orders = row["orders"]
    return {
        "rows_per_order_measured": round(row["rows"] / orders, 3) if orders else None,
        "orders_in_database": orders,
        "outbox_undelivered_at_end": row["undelivered"],
    }


def config_for(p1: P1Config, rates: list[float], duration: float, **changes) -> P1Config:
    return replace(
        p1,
        rates=rates,
        duration=duration,
        refine=False,
        rows_per_order=float(rows_per_order()),
        measurement="sustained",
        **changes,
    )


async def run(
    server: env.DatabaseServer,
    config: P1Config,
    port: int,
    emit: Callable[[dict], None],
    log_dir,
) -> dict:
    """The ladder, then the summary fields: `sustained_rps` (highest rate that passed with every
    lower rate passing too), whether it is a lower bound, rows per order (wiring and measured)."""
    records = await run_target("switchboard", server, config, port, emit, log_dir)
    cap = capacity(records)
    out = {
        "sustained_rps": cap["capacity_rps"],
        "sustained_is_lower_bound": cap["capacity_is_lower_bound"],
        "sustained_rows_per_order": config.rows_per_order,
        "sustained_duration_s": config.duration,
        "sustained_connections": config.connections,
        "sustained_lowest_rate": min(config.rates),
    }
    url = with_database(server.admin_url, "bench_sustained_switchboard")
    out.update(await measured_rows_per_order(url))
    return out
