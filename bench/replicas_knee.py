"""`uv run --group bench python -m bench.replicas_knee --replicas 1 2 3`: where the knee moves with
N identical switchboard replicas behind deploy/nginx.conf on one database (issue 14, lever 6).

For each N, twice (request capacity, then sustained), from scratch: a fresh database seeded like
P1's, N x `switchboard serve --no-migrate --workers 1` (relay and background tasks inside each,
as in production; all modules), deploy/nginx.conf rendered for their N ports (bench/replicas.py),
then P1's ladder (bench/p1.py `run_ladder`: same generator, same pass criterion) through nginx's
one port at --connections open connections, or the sustained ladder (bench/sustained.py). One
JSON line per step, one per N (`replicas_knee`: capacity and sustained rate), then a table and
Little's law: how many replicas 10,000 requests in flight at p99 < 200 ms would need.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import secrets
import shutil
import signal
import sys
import time

from bench import env, sustained
from bench.loadgen import raise_nofile, run
from bench.p1 import P1Config, capacity, run_ladder
from bench.replicas import find_nginx, free_ports, replica_env, say, start_nginx, stop_all, work_dir

LITTLE_IN_FLIGHT, LITTLE_P99_S = 10_000, 0.2


async def one_ladder(
    n: int, kind: str, config: P1Config, server: env.DatabaseServer, nginx_binary: str, work, emit
) -> list[dict]:
    """N replicas and nginx on a fresh database, one ladder through nginx, everything stopped."""
    url = await server.fresh(f"bench_knee_{kind}")
    skus = env.sku_names(config.skus)
    await env.seed_stock(url, skus, config.stock_per_sku)
    ports = free_ports(n)
    token = secrets.token_hex(16)
    serve = ["serve", "--no-migrate", "--workers", "1", "--backlog", str(config.backlog)]
    serve += ["--backpressure", str(config.backpressure)]
    replicas = [
        env.ServerProcess(
            f"replica-{i}",
            env.switchboard_command() + serve + ["--port", str(port)],
            replica_env(url, token),
            work / "logs" / f"{kind}-n{n}-replica-{i}.log",
        )
        for i, port in enumerate(ports, 1)
    ]
    nginxes = []
    try:
        for replica in replicas:
            replica.start()
        await asyncio.gather(
            *(
                r.wait_ready(f"http://127.0.0.1:{p}/health/ready")
                for r, p in zip(replicas, ports, strict=True)
            )
        )
        listen = free_ports(1)[0]
        nginx = await start_nginx(nginx_binary, work / f"nginx-{kind}-{n}", listen, ports, nginxes)
        roots = {f"server_{i}": r.pid for i, r in enumerate(replicas, 1)}
        roots |= {"nginx": nginx.proc.pid, "postgres": server.postmaster_pid}
        records = await run_ladder(
            f"replicas-{n}", f"http://127.0.0.1:{listen}", url, skus, roots, config, emit
        )
        for record in records:
            record["replicas"] = n
        return records
    finally:
        for each in nginxes:
            with contextlib.suppress(Exception):
                each.stop(signal.SIGTERM)
        await asyncio.to_thread(stop_all, replicas)


def little(
    per_replica_rps: float, in_flight: int = LITTLE_IN_FLIGHT, latency_s: float = LITTLE_P99_S
) -> dict:
    """L = lambda x W: `in_flight` requests answered within `latency_s` need in_flight / latency_s
    req/s, so that many / what one replica sustains replicas (one core each, the database apart)."""
    needed = in_flight / latency_s
    return {
        "needed_rps": needed,
        "replicas": math.ceil(needed / per_replica_rps) if per_replica_rps else None,
    }


async def main_async(args: argparse.Namespace) -> list[dict]:
    raise_nofile(args.connections * 2 + 1024)  # nginx and the replicas inherit it
    somax = env.raise_somaxconn(max(args.connections, 4096))
    backlog = min(max(args.connections, 4096), somax.get("somaxconn") or 4096)
    nginx_binary = find_nginx()
    work = work_dir(args.data_dir)
    server = env.DatabaseServer(work / "postgres", os.environ.get("DATABASE_URL") or None)
    p1 = P1Config(
        connections=args.connections,
        rates=args.rates,
        duration=args.duration,
        warmup=args.warmup,
        drain_timeout=15,
        skus=1000,
        stock_per_sku=1_000_000_000,
        refine=True,
        backlog=backlog,
        backpressure=20000,
    )
    configs = {
        "capacity": p1,
        "sustained": sustained.config_for(p1, args.sustained_rates, args.sustained_duration),
    }
    rows: list[dict] = []
    try:
        for n in args.replicas:
            row: dict = {"measurement": "replicas_knee", "replicas": n, "connections": args.connections}
            for kind in args.measure:
                say(f"{n} replica(s): {kind} ladder")
                records = await one_ladder(n, kind, configs[kind], server, nginx_binary, work, emit)
                cap = capacity(records)
                row[f"{kind}_rps"] = cap["capacity_rps"]
                row[f"{kind}_is_lower_bound"] = cap["capacity_is_lower_bound"]
            best = row.get("sustained_rps") or row.get("capacity_rps") or 0.0
            row["little"] = little(best / n) if best else None  # per replica, at this N
            emit(row)
            rows.append(row)
        return rows
    finally:
        await server.close()
        env.restore_somaxconn(somax)
        if args.data_dir or args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def emit(record: dict) -> None:
    import json

    print(json.dumps(record, default=str), flush=True)


def _cell(row: dict, kind: str) -> str:
    if f"{kind}_rps" not in row:
        return "-"
    return (">= " if row[f"{kind}_is_lower_bound"] else "") + f"{row[f'{kind}_rps']:g}"


def table(rows: list[dict]) -> str:
    lines = ["replicas  capacity req/s  sustained orders/s  replicas for 10,000 in flight at p99 < 200 ms"]
    for r in rows:
        lt = r.get("little") or {}
        lines.append(
            f"{r['replicas']:>8}  {_cell(r, 'capacity'):>14}  {_cell(r, 'sustained'):>18}  {lt.get('replicas', '-')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replicas_knee", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3], help="N values, in order")
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--rates", type=float, nargs="+", default=[500, 750, 1000, 1250, 1500, 2000, 2500, 3000])
    p.add_argument("--duration", type=float, default=20.0, help="seconds per capacity step")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--sustained-rates", type=float, nargs="+", default=[375, 500, 625, 750, 875, 1000, 1250])
    p.add_argument("--sustained-duration", type=float, default=30.0)
    p.add_argument(
        "--measure", default="capacity,sustained", help="capacity, sustained or both (comma-separated)"
    )
    p.add_argument("--data-dir", help="work in this folder and keep it (default: a temporary one, deleted)")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    args.measure = [m.strip() for m in args.measure.split(",") if m.strip()]
    if set(args.measure) - {"capacity", "sustained"}:
        p.error("--measure: capacity, sustained")
    started = time.monotonic()
    try:
        rows = run(main_async(args))
    except KeyboardInterrupt:
        say("interrupted: everything stopped")
        return 130
    print()
    print(table(rows))
    print(f"\n({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
