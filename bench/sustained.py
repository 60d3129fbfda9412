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


MEASURED_SQL = """
SELECT (SELECT count(*) FROM outbox) AS rows,
       (SELECT count(*) FROM events WHERE type = 'orders.OrderPlaced') AS orders,
       (SELECT count(*) FROM outbox WHERE status <> 'delivered') AS undelivered
"""


async def measured_rows_per_order(url: str) -> dict:
    """Outbox rows per order in a database that only P1-style orders went into (delivered rows
    stay for the outbox retention, an hour by default): meaningful once nothing is undelivered."""
    conn = await asyncpg.connect(url)
    try:
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
