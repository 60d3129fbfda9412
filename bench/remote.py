"""Remote transport vs local (issue 5, split deployment): the same `mediator.ask(GetStockLevel)` /
`mediator.send(ReserveStock)`, closed loop from C concurrent workers for D seconds, once with the
inventory module hosted in the bench process (LOCAL) and once with it hosted by a real
`switchboard serve --modules inventory` subprocess that the bench process reaches over HTTP
through the registry and `app.remote.RemoteTransport` (REMOTE).

LOCAL: `bootstrap(Settings(modules=None), db)` in the bench process: mediator → handler → asyncpg.
REMOTE: `bootstrap(Settings(modules=("orders", "payments", "notifications"), internal_token=T), db)`
in the bench process, `transport.start()`: mediator → registry lookup (cached) → aiohttp →
granian/litestar in the other process → `POST /internal/messages/inventory.<Type>` → its mediator →
handler → asyncpg, and back. Same database, same pool size (20) on the side that runs the handler.

Both sides share the machine's cores with PostgreSQL (and with whatever else runs there): the
remote number includes the serving process's CPU, so it measures the transport's cost on one box,
not what two boxes would give.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import secrets
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.bootstrap import bootstrap
from app.db import Database
from app.settings import Settings
from bench import env
from bench.loadgen import percentile
from modules.inventory.commands import AddStock, ReserveStock, StockLine
from modules.inventory.queries import GetStockLevel

perf = time.perf_counter

REMOTE_CALLER_MODULES = ("orders", "payments", "notifications")
HEARTBEAT = 1.0
STOCK = 1_000_000_000

NOTE = (
    "LOCAL runs the handler in the bench process (mediator -> handler -> PostgreSQL). REMOTE crosses a real "
    "loopback socket to a separate `switchboard serve --modules inventory` (granian, 1 worker) process: its "
    "latency and req/s include that process's CPU (HTTP parse, litestar, msgspec, its own mediator) on the same "
    "cores as the bench process and PostgreSQL, so this is the transport's cost on one shared machine, not what "
    "two machines would give. Other load on the machine (see cpu_machine) makes the numbers noisy: compare "
    "local and remote within one run."
)


@dataclass
class RemoteConfig:
    concurrency: int = 32
    duration: float = 2.5  # measured seconds per side per message per round
    warmup: float = 0.5  # unmeasured seconds before each measured run (pools and keep-alive warm)
    rounds: int = 1  # each round runs local and remote; the order alternates between rounds
    query_skus: int = 8  # seeded with AddStock; GetStockLevel reads one at random
    reserve_skus: int = 1000  # per side; ReserveStock holds 1 unit of one at random (few conflicts)
    reserve: bool = True


def _cpu_self() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


async def closed_loop(
    call: Callable[[Any], Awaitable[Any]],
    make: Callable[[], Any],
    concurrency: int,
    duration: float,
    roots: dict[str, int | None] | None = None,
) -> dict:
    """`concurrency` workers each call, wait for the answer, call again, until `duration` is up.
    Returns the completed calls' latencies (seconds), errors by type, wall time and CPU."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    stop_at = perf() + duration

    async def worker() -> None:
        while True:
            started = perf()
            if started >= stop_at:
                return
            message = make()
            try:
                await call(message)
            except Exception as error:  # counted; a short pause so an open breaker cannot spin
                errors[type(error).__name__] += 1
                await asyncio.sleep(0.01)
            else:
                latencies.append(perf() - started)

    meter = env.CpuMeter(roots or {})
    meter.start()
    cpu0, t0 = _cpu_self(), perf()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = perf() - t0
    cpu = meter.stop()
    cpu["cpu_bench"] = round((_cpu_self() - cpu0) / elapsed, 3)
    return {"latencies": latencies, "errors": errors, "seconds": elapsed, "cpu": cpu}


def _summarise(runs: list[dict]) -> dict:
    latencies = sorted(v for r in runs for v in r["latencies"])
    seconds = sum(r["seconds"] for r in runs)
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r["errors"])

    def ms(q: float) -> float | None:
        return round(percentile(latencies, q) * 1000, 3) if latencies else None

    cpu_keys = sorted({k for r in runs for k in r["cpu"]})
    # CPU seconds of our processes (bench + inventory server + PostgreSQL) per completed call:
    # less sensitive than req/s to other people's load on the machine
    ours = sum(
        r["cpu"].get(k, 0.0) * r["seconds"] for r in runs for k in ("cpu_bench", "cpu_server", "cpu_postgres")
    )
    return {
        "completed": len(latencies),
        "errors": sum(errors.values()),
        "errors_by_type": dict(errors),
        "seconds": round(seconds, 3),
        "rps": round(len(latencies) / seconds, 1) if seconds else 0.0,
        "rps_by_round": [round(len(r["latencies"]) / r["seconds"], 1) for r in runs],
        "p50_ms": ms(50),
        "p90_ms": ms(90),
        "p99_ms": ms(99),
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else None,
        "cpu_us_per_call": round(ours / len(latencies) * 1e6, 1) if latencies else None,
        # cores used while measuring, time-weighted over the rounds
        **{k: round(sum(r["cpu"].get(k, 0.0) * r["seconds"] for r in runs) / seconds, 3) for k in cpu_keys},
    }


def _compare(local: dict, remote: dict) -> dict:
    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    return {
        "local": local,
        "remote": remote,
        "rps_ratio_remote_over_local": ratio(remote["rps"], local["rps"]),
        "p50_ratio_remote_over_local": ratio(remote["p50_ms"], local["p50_ms"]),
        "p99_ratio_remote_over_local": ratio(remote["p99_ms"], local["p99_ms"]),
        "cpu_per_call_ratio_remote_over_local": ratio(remote["cpu_us_per_call"], local["cpu_us_per_call"]),
        "added_p50_ms": round(remote["p50_ms"] - local["p50_ms"], 3)
        if remote["p50_ms"] and local["p50_ms"]
        else None,
    }


async def measure(server: env.DatabaseServer, config: RemoteConfig, port: int, log_dir: Path) -> dict:
    started = perf()
    url = await server.fresh("bench_remote")
    token = secrets.token_urlsafe(24)
    base = f"http://127.0.0.1:{port}"
    server_env = env.server_env(url)
    server_env.update(
        {
            "SWITCHBOARD_INTERNAL_TOKEN": token,
            "SWITCHBOARD_HEARTBEAT": str(HEARTBEAT),
            "SWITCHBOARD_BASE_URL": base,
            "SWITCHBOARD_MODULES": "inventory",
            # no payment outcome ever reaches these holds (payments runs nowhere here): keep the
            # hold-expiry sweep from releasing them mid-measurement
            "SWITCHBOARD_RESERVATION_TTL": "3600",
        }
    )
    command = env.switchboard_command() + [
        "serve",
        "--no-migrate",
        "--port",
        str(port),
        "--modules",
        "inventory",
    ]
    proc = env.ServerProcess("remote-inventory", command, server_env, log_dir / "remote-inventory.log")
    proc.start()  # starts while we seed
    db = await Database(url, max_size=Settings().db_pool_size).connect()
    remote = None
    try:
        local = bootstrap(Settings(database_url=url, modules=None, instance_id="bench-local"), db)
        query_skus = [f"q-{i:03d}" for i in range(config.query_skus)]
        for sku in query_skus:
            await local.mediator.send(AddStock(sku=sku, quantity=STOCK))
        reserve_skus = {
            side: [f"r-{side}-{i:05d}" for i in range(config.reserve_skus)] for side in ("local", "remote")
        }
        if config.reserve:  # one statement, as P1 seeds: each side reserves from its own SKUs
            await env.seed_stock(url, reserve_skus["local"] + reserve_skus["remote"], STOCK)
        await proc.wait_ready(base + "/health/ready")

        remote = bootstrap(
            Settings(
                database_url=url,
                modules=REMOTE_CALLER_MODULES,
                internal_token=token,
                instance_id="bench-remote",
                heartbeat_seconds=HEARTBEAT,
            ),
            db,
        )
        await remote.transport.start()
        check = GetStockLevel(sku=query_skus[0])
        here, there = await local.mediator.ask(check), await remote.mediator.ask(check)
        assert here == there and here.available == STOCK, (here, there)

        setup_seconds = perf() - started  # fresh database, seeding, server start (overlapped)
        roots = {"server": proc.pid, "postgres": server.postmaster_pid}
        systems = {"local": local, "remote": remote}

        def query_maker(side: str):
            return lambda: GetStockLevel(sku=random.choice(query_skus))

        def reserve_maker(side: str):
            skus = reserve_skus[side]
            return lambda: ReserveStock(
                order_id=uuid.uuid4(), lines=(StockLine(sku=random.choice(skus), quantity=1),)
            )

        messages: dict[str, tuple[str, Callable[[str], Callable[[], Any]]]] = {
            "GetStockLevel": ("ask", query_maker)
        }
        if config.reserve:
            messages["ReserveStock"] = ("send", reserve_maker)

        runs: dict[str, dict[str, list[dict]]] = {m: {"local": [], "remote": []} for m in messages}
        for round_no in range(config.rounds):
            order = ("local", "remote") if round_no % 2 == 0 else ("remote", "local")
            for name, (verb, maker) in messages.items():
                for side in order:
                    call = getattr(systems[side].mediator, verb)
                    make = maker(side)
                    if config.warmup > 0:
                        await closed_loop(call, make, config.concurrency, config.warmup)
                    run = await closed_loop(call, make, config.concurrency, config.duration, roots)
                    runs[name][side].append(run)

        results = {
            name: _compare(_summarise(sides["local"]), _summarise(sides["remote"]))
            for name, sides in runs.items()
        }
        return {
            "measurement": "remote_vs_local",
            **asdict(config),
            "server": "switchboard serve --no-migrate --modules inventory --workers 1 (granian, uvloop)",
            "server_pid": proc.pid,
            "caller_modules": list(REMOTE_CALLER_MODULES),
            "db_pool_size": Settings().db_pool_size,
            "bench_pid": os.getpid(),
            "results": results,
            "note": NOTE,
            "setup_seconds": round(setup_seconds, 1),
            "total_seconds": round(perf() - started, 1),
        }
    finally:
        if remote is not None:
            await remote.transport.close()
        await db.close()
        code = proc.stop()
        if code not in (0, None):
            print(f"warning: remote-inventory server exited with {code}:\n{proc.tail()}", file=sys.stderr)
