"""NATS request-reply vs HTTP for commands and queries across process groups (issue 15, build item
4: "choose by measurement"). The same `mediator.ask(GetStockLevel)` / `mediator.send(ReserveStock)`,
closed loop from C concurrent workers for D seconds, three ways in one run, alternating:

- local: inventory hosted in the bench process (mediator -> handler -> PostgreSQL), the floor;
- http: `app.remote.RemoteTransport` -> aiohttp -> `POST /internal/messages/...` on the server;
- nats: `app.broker.rpc.NatsTransport` -> `nc.request` -> nats-server -> the server's responder.

The server is one real `switchboard serve --no-migrate --modules inventory` (granian, 1 worker)
with both SWITCHBOARD_INTERNAL_TOKEN (its HTTP endpoint, its registry entry) and
SWITCHBOARD_NATS_URL (its responders, through app/broker/runtime.py), so both remote transports
reach the same process, handler and database; nats-server is a single `nats-server -js` this
bench starts. Everything shares the machine's cores: the numbers are the transports' cost on one
box, not what separate machines would give.

    uv run --group bench python -m bench.rpc [--concurrency 1 8 32] [--duration 2] [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.bootstrap import bootstrap
from app.broker.server import server_command
from app.db import Database
from app.settings import Settings
from bench import env
from bench.remote import REMOTE_CALLER_MODULES, STOCK, _summarise, closed_loop
from modules.inventory.commands import AddStock, ReserveStock, StockLine
from modules.inventory.queries import GetStockLevel

SIDES = ("local", "http", "nats")
HEARTBEAT = 1.0

NOTE = (
    "local: the handler in the bench process. http and nats: the same `switchboard serve --modules inventory` "
    "process (granian, 1 worker), over aiohttp + litestar or over one nats-server; latency and calls/s include "
    "that process's, nats-server's and PostgreSQL's CPU on the same cores as the bench process. The server also "
    "publishes inventory's events to JetStream (its subscribers live in another group), equally for both remote "
    "sides. Compare the sides within one run; other load on the machine makes runs noisy."
)


@dataclass
class RpcConfig:
    concurrencies: list[int] = field(default_factory=lambda: [1, 8, 32])
    duration: float = 2.0  # measured seconds per side, message and concurrency, per round
    warmup: float = 0.5  # unmeasured seconds before each measured run
    rounds: int = 2  # the sides' order rotates between rounds
    query_skus: int = 8
    reserve_skus: int = 1000  # per side; ReserveStock holds 1 unit of one at random (few conflicts)
    sides: list[str] = field(default_factory=lambda: list(SIDES))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ratios(sides: dict[str, dict]) -> dict:
    http, nats = sides.get("http"), sides.get("nats")
    if not http or not nats:
        return {}

    def ratio(key: str) -> float | None:
        return round(nats[key] / http[key], 3) if nats.get(key) and http.get(key) else None

    return {f"nats_over_http_{k}": ratio(k) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_call")}


async def measure(server: env.DatabaseServer, config: RpcConfig, log_dir: Path) -> dict:
    import nats

    started = time.perf_counter()
    url = await server.fresh("bench_rpc")
    token = secrets.token_urlsafe(24)
    port, nats_port, monitor = free_port(), free_port(), free_port()
    base, nats_url = f"http://127.0.0.1:{port}", f"nats://127.0.0.1:{nats_port}"
    (log_dir / "nats-store").mkdir(parents=True, exist_ok=True)
    broker = env.ServerProcess(
        "nats-server", server_command("127.0.0.1", nats_port, log_dir / "nats-store", monitor_port=monitor),
        dict(os.environ), log_dir / "nats-server.log",
    )  # fmt: skip
    broker.start()
    server_env = env.server_env(url)
    server_env.update({
        "SWITCHBOARD_INTERNAL_TOKEN": token, "SWITCHBOARD_HEARTBEAT": str(HEARTBEAT), "SWITCHBOARD_BASE_URL": base,
        "SWITCHBOARD_MODULES": "inventory", "SWITCHBOARD_NATS_URL": nats_url,
        # no payment outcome reaches these holds: keep the hold-expiry sweep from releasing them meanwhile
        "SWITCHBOARD_RESERVATION_TTL": "3600",
    })  # fmt: skip
    command = env.switchboard_command() + ["serve", "--no-migrate", "--port", str(port), "--modules", "inventory"]
    inventory = env.ServerProcess("rpc-inventory", command, server_env, log_dir / "rpc-inventory.log")
    db = await Database(url, max_size=Settings().db_pool_size).connect()
    systems: dict[str, Any] = {}
    nc = None
    try:
        await broker.wait_ready(f"http://127.0.0.1:{monitor}/healthz")
        inventory.start()  # starts while we seed
        local = systems["local"] = bootstrap(Settings(database_url=url, modules=None, instance_id="bench-local"), db)
        query_skus = [f"q-{i:03d}" for i in range(config.query_skus)]
        for sku in query_skus:
            await local.mediator.send(AddStock(sku=sku, quantity=STOCK))
        reserve_skus = {side: [f"r-{side}-{i:05d}" for i in range(config.reserve_skus)] for side in SIDES}
        await env.seed_stock(url, [s for skus in reserve_skus.values() for s in skus], STOCK)
        await inventory.wait_ready(base + "/health/ready")  # ready once its responders are subscribed

        caller = {"database_url": url, "modules": REMOTE_CALLER_MODULES, "internal_token": token}
        http = systems["http"] = bootstrap(
            Settings(**caller, instance_id="bench-http", heartbeat_seconds=HEARTBEAT), db
        )
        await http.transport.start()
        over_nats = systems["nats"] = bootstrap(Settings(**caller, instance_id="bench-nats", nats_url=nats_url), db)
        nc = await nats.connect(nats_url)
        await over_nats.transport.attach(nc, over_nats)
        check = GetStockLevel(sku=query_skus[0])
        answers = [await systems[side].mediator.ask(check) for side in SIDES]
        assert all(a == answers[0] for a in answers) and answers[0].available == STOCK, answers
        setup_seconds = time.perf_counter() - started

        roots = {"server": inventory.pid, "postgres": server.postmaster_pid, "nats": broker.pid}
        messages = {
            "GetStockLevel": ("ask", lambda side: lambda: GetStockLevel(sku=random.choice(query_skus))),
            "ReserveStock": ("send", lambda side: lambda: ReserveStock(
                order_id=uuid.uuid4(), lines=(StockLine(sku=random.choice(reserve_skus[side]), quantity=1),))),
        }  # fmt: skip
        runs: dict[str, dict[int, dict[str, list]]] = {
            m: {c: {s: [] for s in config.sides} for c in config.concurrencies} for m in messages
        }
        for round_no in range(config.rounds):
            shift = round_no % len(config.sides)
            order = config.sides[shift:] + config.sides[:shift]  # each side goes first in turn
            for concurrency in config.concurrencies:
                for name, (verb, maker) in messages.items():
                    for side in order:
                        call, make = getattr(systems[side].mediator, verb), maker(side)
                        if config.warmup > 0:
                            await closed_loop(call, make, concurrency, config.warmup)
                        runs[name][concurrency][side].append(
                            await closed_loop(call, make, concurrency, config.duration, roots)
                        )
        results = {
            name: {
                str(c): {**(sides := {s: _summarise(r) for s, r in by_side.items()}), **_ratios(sides)}
                for c, by_side in by_concurrency.items()
            }
            for name, by_concurrency in runs.items()
        }
        return {
            "measurement": "rpc_nats_vs_http",
            **asdict(config),
            "server": "switchboard serve --no-migrate --modules inventory --workers 1 (granian, uvloop), "
            "SWITCHBOARD_NATS_URL and SWITCHBOARD_INTERNAL_TOKEN set",
            "broker": "nats-server -js, single node (" + broker.command[0] + ")",
            "caller_modules": list(REMOTE_CALLER_MODULES),
            "results": results,
            "note": NOTE,
            "machine": env.machine(),
            "setup_seconds": round(setup_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
        }
    finally:
        if "http" in systems:
            await systems["http"].transport.close()
        if "nats" in systems:
            await systems["nats"].transport.close()
        if nc is not None:
            await nc.close()
        await db.close()
        for process in (inventory, broker):
            code = process.stop()
            if code not in (0, None):
                print(f"warning: {process.name} exited with {code}:\n{process.tail()}", file=sys.stderr)


def table(record: dict) -> str:
    lines = ["message        conc  side    calls/s   p50 ms   p99 ms  cpu us/call  errors"]
    for name, by_concurrency in record["results"].items():
        for c, sides in by_concurrency.items():
            for side in record["sides"]:
                s = sides[side]
                lines.append(f"{name:<14} {c:>4}  {side:<6} {s['rps']:>8.0f} {s['p50_ms'] or 0:>8.3f} "
                             f"{s['p99_ms'] or 0:>8.3f} {s['cpu_us_per_call'] or 0:>12.0f} {s['errors']:>7}")  # fmt: skip
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> dict:
    config = RpcConfig(
        concurrencies=args.concurrency, duration=args.duration, warmup=args.warmup, rounds=args.rounds,
        query_skus=args.query_skus, reserve_skus=args.reserve_skus,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-rpc-") as tmp:
        server = env.DatabaseServer(Path(tmp), os.environ.get("DATABASE_URL"))
        try:
            record = await measure(server, config, Path(tmp) / "logs")
        finally:
            await server.close()
    return record


def report(record: dict, out: str | None) -> None:
    line = json.dumps(record)
    if out:
        with open(out, "a") as file:
            file.write(line + "\n")
    else:
        print(line, flush=True)
    print(table(record), file=sys.stdout if out else sys.stderr, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--query-skus", type=int, default=8)
    parser.add_argument("--reserve-skus", type=int, default=1000)
    parser.add_argument("--out", help="append the JSON record to this file (default: stdout)")
    import uvloop

    arguments = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        report(runner.run(main(arguments)), arguments.out)
