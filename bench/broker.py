"""Events across databases (issue 15) side by side with the in-database relay, in one run.

    uv run --group bench python -m bench.broker [--orders 2000] [--rates 25 50 100] [--duration 8]
                                                [--rounds 2] [--nats-nodes 3 1]     # ~7 min

Real processes over real sockets: one embedded PostgreSQL in a temporary folder (or DATABASE_URL's
server) holding every database, `switchboard serve` processes (1 granian worker each, production
settings: SWITCHBOARD_* pass through), a real `nats-server` cluster on loopback. The setups, each
round in turn (in-database first, then each broker setup), every one on fresh databases:

- **in_database**: one `serve` with all four modules on one database, no broker; the relay in it
  delivers OrderPlaced to payments.charge_order.
- **across_r3** (`--nats-nodes 3`): group A (`--modules orders,inventory`) on database A, group B
  (`--modules payments,notifications`) on database B, SWITCHBOARD_NATS_URL = a 3-node JetStream
  cluster (tests/broker/conftest.py's), so the stream has 3 replicas. `--nats-nodes 1`: one
  server, the stream at 1 replica (`across_r1`). The stream is deleted before each round.

Each setup is measured twice:

1. **drain** (throughput at saturation): `--orders` PlaceOrder through the mediator in this
   process (as bench.drain's place half) while nothing delivers, so a backlog of OrderPlaced waits:
   in the outbox (in_database), or, once A's publisher has put it on the stream, in JetStream
   before B exists (across). Then the consuming side starts (the server; B) and delivers it all.
   `charge_per_s` = OrderPlaced -> payments.charge_order deliveries per second, from the first to
   the last Payment* event's `created_at`; `flow_per_s` = orders completed (OrderPaid,
   ReservationCommitted and the notification all written) per second from the first charge to
   the last completion. CPU (ms per order) of each process tree, from /proc, between the first
   charge seen and the last completion (polled every 20 ms: the consuming process's start-up is
   outside it). Across: `publish_per_s` and its CPU, A's publisher emptying its outbox into the
   stream, measured the same way before B starts.
2. **lag** at steady offered rates (`--rates`, `--duration` s each, open loop over HTTP to
   the server / to A, 64 connections): per order, `hop` = the Payment* event's `created_at` on
   the consuming database − the OrderPlaced event's `created_at` on the placing one; `flow` =
   the order's last completion − the same start. `created_at` is `now()`, the start of the
   writing transaction, and both databases are on one server (one clock): the OrderPlaced append
   is the order's last transaction of the request (one statement, so its start is its commit
   within the statement's time); the charge's is the transaction the consumer (or the relay's
   run) opened before running the handler. So `hop` = commit on A -> the handler's transaction
   began on B: the publisher's wake-up and claim, the publish and its JetStream ack (replicated),
   the consumer's fetch -- or the relay's wake-up, linger and claim.

One JSON line per measurement and a `broker_summary` line per setup (medians of the rounds'
rates; lag percentiles over every round's orders), then a table. Results also go to
bench/results/broker-<time>.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import asyncpg

from app.bootstrap import bootstrap
from app.broker.server import server_command
from app.broker.stream import STREAM
from app.db import Database
from app.settings import Settings
from bench import env
from bench.__main__ import Output
from modules.orders.commands import OrderLine, PlaceOrder

A_MODULES = "orders,inventory"
B_MODULES = "payments,notifications"
SKUS = 1000
STOCK = 1_000_000_000
PLACE_CONCURRENCY = 32
HTTP_CONNECTIONS = 64
POLL = 0.02
SETTLE_TIMEOUT = 180.0

# order id -> when (created_at, as epoch seconds) for each fact of the happy path
FACTS_SQL = {
    "placed": "SELECT data->>'order_id' AS id, extract(epoch FROM created_at) AS t FROM events WHERE type = 'orders.OrderPlaced'",
    "charged": "SELECT data->>'order_id' AS id, extract(epoch FROM created_at) AS t FROM events"
    " WHERE type IN ('payments.PaymentCaptured', 'payments.PaymentDeclined')",
    "paid": "SELECT data->>'order_id' AS id, extract(epoch FROM created_at) AS t FROM events WHERE type = 'orders.OrderPaid'",
    "committed": "SELECT data->>'order_id' AS id, extract(epoch FROM created_at) AS t FROM events"
    " WHERE type = 'inventory.ReservationCommitted'",
    "notified": "SELECT order_id::text AS id, extract(epoch FROM created_at) AS t FROM notifications_sent",
}
COUNT_SQL = {
    "charged": "SELECT count(*) FROM events WHERE type IN ('payments.PaymentCaptured', 'payments.PaymentDeclined')",
    "paid": "SELECT count(*) FROM events WHERE type = 'orders.OrderPaid'",
    "committed": "SELECT count(*) FROM events WHERE type = 'inventory.ReservationCommitted'",
    "notified": "SELECT count(*) FROM notifications_sent",
    "publish_pending": "SELECT count(*) FROM outbox WHERE subscriber = 'broker.publish' AND status = 'pending'",
}
# which database holds each fact: "place" (A, or the one database) or "consume" (B)
SIDE = {"placed": "place", "paid": "place", "committed": "place", "charged": "consume", "notified": "consume"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- NATS ------------------------------------------------------------------------------------------


@dataclass
class Nats:
    urls: list[str]
    pids: list[int]
    stop: object  # () -> None


async def start_nats(nodes: int, base: Path) -> Nats:
    """A 3-node cluster as the broker tests start it, or one plain JetStream server."""
    if nodes == 3:
        from tests.broker.conftest import ready_cluster, stop_cluster

        cluster = await ready_cluster(base / "nats-r3")
        return Nats(cluster.urls, [n.process.pid for n in cluster.nodes], lambda: stop_cluster(cluster))
    if nodes != 1:
        raise SystemExit("--nats-nodes takes 1 or 3")
    port = free_port()
    proc = _spawn_single(base, port)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    import nats

    url = f"nats://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            nc = await nats.connect(url, connect_timeout=1, max_reconnect_attempts=0)
            await nc.jetstream().account_info()
            await nc.close()
            return Nats([url], [proc.pid], stop)
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                stop()
                raise
            await asyncio.sleep(0.1)


def _nats_version() -> str:
    from app.broker.server import nats_server_binary

    return subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True).stdout.strip()


def _spawn_single(base: Path, port: int) -> subprocess.Popen:
    store = base / "nats-r1"
    store.mkdir(parents=True, exist_ok=True)
    with open(base / "nats-r1.log", "ab") as log:
        command = server_command("127.0.0.1", port, store, name="bench-r1")
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def delete_stream(urls: list[str]) -> None:
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(urls)
    try:
        try:
            await nc.jetstream().delete_stream(STREAM)
        except NotFoundError:
            pass
    finally:
        await nc.close()


# -- one setup's processes and databases -----------------------------------------------------------


@dataclass
class Setup:
    name: str
    place_url: str  # A, or the one database
    consume_url: str  # B, or the same
    base: str = ""  # HTTP of the server orders are placed on
    servers: dict[str, env.ServerProcess] = field(default_factory=dict)
    roots: dict[str, int | None] = field(default_factory=dict)

    def start(self, name: str, url: str, modules: str | None, log_dir: Path, extra: dict[str, str]) -> str:
        port = free_port()
        command = env.switchboard_command() + ["serve", "--no-migrate", "--port", str(port), "--workers", "1"]
        if modules:
            command += ["--modules", modules]
        proc = env.ServerProcess(
            f"{self.name}-{name}", command, env.server_env(url) | extra, log_dir / f"{self.name}-{name}.log"
        )
        proc.start()
        self.servers[name] = proc
        self.roots[name] = proc.pid
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        for proc in self.servers.values():
            code = proc.stop()
            if code not in (0, None, -15):
                print(f"{proc.name} exited with {code}:\n{proc.tail()}", file=sys.stderr)


async def place_backlog(
    url: str, orders: int, skus: list[str], nats_url: str | None, modules: str | None
) -> float:
    """`orders` PlaceOrder through the mediator here, nothing delivering: the backlog. Seconds taken."""
    settings = replace(Settings.from_env(), database_url=url, instance_id="bench-broker-place",
                       nats_url=nats_url, modules=tuple(modules.split(",")) if modules else None)  # fmt: skip
    db = await Database(url, max_size=settings.db_pool_size).connect()
    try:
        system = bootstrap(settings, db)
        limit = asyncio.Semaphore(PLACE_CONCURRENCY)

        async def place(i: int) -> None:
            async with limit:
                line = OrderLine(sku=random.choice(skus), quantity=1)
                await system.mediator.send(
                    PlaceOrder(customer_id=f"c-{i}", lines=(line,), payment_method="pm_card_ok")
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(place(i) for i in range(orders)))
        return time.perf_counter() - t0
    finally:
        await db.close()


class Watch:
    """Counts of the flow's facts on both databases."""

    def __init__(self, place: asyncpg.Connection, consume: asyncpg.Connection) -> None:
        self.conns = {"place": place, "consume": consume}

    async def count(self, fact: str) -> int:
        side = "place" if fact == "publish_pending" else SIDE[fact]
        return await self.conns[side].fetchval(COUNT_SQL[fact])

    async def completed(self) -> int:
        return min([await self.count(f) for f in ("charged", "paid", "committed", "notified")])

    async def until(self, what: str, condition, timeout: float = SETTLE_TIMEOUT) -> float:
        """Poll until condition() holds; returns the perf_counter when it did."""
        deadline = time.monotonic() + timeout
        while not await condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached after {timeout:g} s")
            await asyncio.sleep(POLL)  # noqa: ASYNC110 (polls other processes' databases)
        return time.perf_counter()

    async def facts(self) -> dict[str, dict[str, float]]:
        return {
            f: {r["id"]: float(r["t"]) for r in await self.conns[SIDE[f]].fetch(sql)}
            for f, sql in FACTS_SQL.items()
        }


def _cpu(roots: dict[str, int | None]) -> dict[str, float]:
    return env.tree_cpu(roots)


def _cpu_per_order(before: dict, after: dict, orders: int) -> dict[str, float]:
    out = {
        f"cpu_ms_per_order_{k}": round((after[k] - before[k]) / orders * 1000, 3)
        for k in after
        if k in before
    }
    ours = sum(after[k] - before[k] for k in after if k in before and k != "postgres")
    out["cpu_ms_per_order_ours"] = round(ours / orders * 1000, 3)
    if "postgres" in after and "postgres" in before:
        out["cpu_ms_per_order_total"] = round(
            (ours + after["postgres"] - before["postgres"]) / orders * 1000, 3
        )
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(values: list[float]) -> dict:
    return {
        f"p{int(q * 100)}_ms": round(_pct(values, q) * 1000, 1) if values else None for q in (0.5, 0.9, 0.99)
    } | {"max_ms": round(max(values) * 1000, 1) if values else None}


def lags(facts: dict[str, dict[str, float]], ids: list[str]) -> tuple[list[float], list[float], int]:
    """(hop lags, flow lags, orders not complete) in seconds for these orders."""
    hop, flow, missing = [], [], 0
    for order in ids:
        placed = facts["placed"].get(order)
        ends = [facts[f].get(order) for f in ("paid", "committed", "notified")]
        charged = facts["charged"].get(order)
        if placed is None or charged is None or None in ends:
            missing += 1
            continue
        hop.append(charged - placed)
        flow.append(max(ends) - placed)
    return hop, flow, missing


def completion_times(facts: dict[str, dict[str, float]]) -> list[float]:
    return [max(facts[f][o] for f in ("paid", "committed", "notified")) for o in facts["placed"]
            if all(o in facts[f] for f in ("paid", "committed", "notified"))]  # fmt: skip


# -- the two measurements --------------------------------------------------------------------------


async def drain(setup: Setup, watch: Watch, orders: int, start_consumer, postgres: int | None) -> dict:
    """Start the consuming side on the waiting backlog and time it through."""
    roots = setup.roots | {"postgres": postgres}
    await start_consumer()
    await watch.until("the first charge", lambda: _at_least(watch, "charged", 1))
    t0, cpu0, box0 = time.perf_counter(), _cpu(roots | setup.roots), env.machine_busy()
    t_charged = await watch.until("every order charged", lambda: _at_least(watch, "charged", orders))
    t_done = await watch.until("every order complete", lambda: _completed(watch, orders))
    cpu1, box1 = _cpu(roots | setup.roots), env.machine_busy()
    facts = await watch.facts()
    charges = sorted(facts["charged"].values())
    done = completion_times(facts)
    charge_span = charges[-1] - charges[0]
    flow_span = max(done) - charges[0]
    return {
        "orders": orders,
        "charge_per_s": round((len(charges) - 1) / charge_span, 1) if charge_span > 0 else None,
        "flow_per_s": round(len(done) / flow_span, 1) if flow_span > 0 else None,
        "charge_seconds": round(charge_span, 3),
        "flow_seconds": round(flow_span, 3),
        "polled_charge_seconds": round(t_charged - t0, 3),
        "polled_flow_seconds": round(t_done - t0, 3),
        # the whole machine's busy cores meanwhile, ours or not: near 2 = someone else's load too
        "box_cores": round((box1 - box0) / (t_done - t0), 2),
        "our_cores": round(sum(cpu1[k] - cpu0[k] for k in cpu1 if k in cpu0) / (t_done - t0), 2),
        **_cpu_per_order(cpu0, cpu1, orders),
    }


async def _at_least(watch: Watch, fact: str, n: int) -> bool:
    return await watch.count(fact) >= n


async def _completed(watch: Watch, n: int) -> bool:
    return await watch.completed() >= n


async def offer(
    session: aiohttp.ClientSession, base: str, skus: list[str], rate: float, duration: float
) -> dict:
    """POST /orders at `rate` for `duration` s, open loop; the order ids and how the requests went."""
    loop = asyncio.get_running_loop()
    count = max(1, int(rate * duration))
    t0 = loop.time() + 0.05
    latencies: list[float] = []
    ids: list[str] = []
    errors: dict[str, int] = {}

    async def one(i: int) -> None:
        at = t0 + i / rate
        await asyncio.sleep(max(0.0, at - loop.time()))
        body = {
            "customer_id": f"r-{i}",
            "items": [{"sku": random.choice(skus), "quantity": 1}],
            "payment_method": "pm_card_ok",
        }
        try:
            async with session.post(f"{base}/orders", json=body) as response:
                reply = await response.json(content_type=None)
                if response.status == 201:
                    ids.append(reply["order_id"])
                else:
                    errors[str(response.status)] = errors.get(str(response.status), 0) + 1
        except (aiohttp.ClientError, TimeoutError) as error:
            errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1
        latencies.append(loop.time() - at)

    await asyncio.gather(*(one(i) for i in range(count)))
    return {"ids": ids, "sent": count, "errors": errors, "request": _ms(latencies)}


async def lag_steps(setup: Setup, watch: Watch, skus: list[str], rates: list[float], duration: float,
                    postgres: int | None, done_before: int) -> list[dict]:  # fmt: skip
    records = []
    roots = setup.roots | {"postgres": postgres}
    connector = aiohttp.TCPConnector(limit=HTTP_CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        total = done_before
        # warm-up: connections opened, first-use costs paid, not measured
        warm = await offer(session, setup.base, skus, rates[0], 1.0)
        total += len(warm["ids"])
        await watch.until("the warm-up's orders complete", lambda: _completed(watch, total))
        for rate in rates:
            cpu0, t0, box0 = _cpu(roots), time.perf_counter(), env.machine_busy()
            sent = await offer(session, setup.base, skus, rate, duration)
            total += len(sent["ids"])
            try:
                await watch.until(f"{rate}/s orders complete", lambda n=total: _completed(watch, n))
                settled = True
            except TimeoutError:
                settled = False
            wall = time.perf_counter() - t0
            cpu1, box = _cpu(roots), (env.machine_busy() - box0) / wall
            hop, flow, missing = lags(await watch.facts(), sent["ids"])
            records.append({
                "rate": rate, "duration": duration, "sent": sent["sent"], "accepted": len(sent["ids"]),
                "errors": sent["errors"], "settled": settled, "incomplete": missing,
                "settle_after_s": round(wall - duration, 2),
                "hop": _ms(hop), "flow": _ms(flow), "request": sent["request"],
                "cores": {k: round((cpu1[k] - cpu0[k]) / wall, 3) for k in cpu1 if k in cpu0},
                "box_cores": round(box, 2),
                **_cpu_per_order(cpu0, cpu1, max(1, len(sent["ids"]))),
                "_hop": hop, "_flow": flow,
            })  # fmt: skip
            if not settled:
                break  # above what it sustains: a higher rate would only queue more
    return records


# -- the setups ------------------------------------------------------------------------------------


async def run_in_database(server: env.DatabaseServer, args, log_dir: Path) -> dict:
    url = await server.fresh("bench_broker_one")
    skus = env.sku_names(SKUS)
    await env.seed_stock(url, skus, STOCK)
    setup = Setup("in_database", url, url)
    place_s = await place_backlog(url, args.orders, skus, None, None)
    conn = await asyncpg.connect(url)
    try:
        watch = Watch(conn, conn)

        async def start() -> None:
            setup.base = setup.start("server", url, None, log_dir, {})
            await setup.servers["server"].wait_ready(setup.base + "/health/ready")

        result = {"drain": await drain(setup, watch, args.orders, start, server.postmaster_pid)}
        result["drain"]["place_seconds"] = round(place_s, 2)
        result["lag"] = await lag_steps(
            setup, watch, skus, args.rates, args.duration, server.postmaster_pid, args.orders
        )
        result["pids"] = [p for p in setup.roots.values() if p]
        return result
    finally:
        setup.stop()
        await conn.close()


async def run_across(server: env.DatabaseServer, nats: Nats, name: str, args, log_dir: Path) -> dict:
    await delete_stream(nats.urls)
    url_a, url_b = await server.fresh("bench_broker_a"), await server.fresh("bench_broker_b")
    skus = env.sku_names(SKUS)
    await env.seed_stock(url_a, skus, STOCK)
    nats_url = ",".join(nats.urls)
    common = {"SWITCHBOARD_NATS_URL": nats_url, "SWITCHBOARD_INTERNAL_TOKEN": secrets.token_hex(16)}
    setup = Setup(name, url_a, url_b)
    place_s = await place_backlog(url_a, args.orders, skus, nats_url, A_MODULES)
    for i, pid in enumerate(nats.pids):
        setup.roots[f"nats{i}"] = pid
    conn_a, conn_b = await asyncpg.connect(url_a), await asyncpg.connect(url_b)
    try:
        watch = Watch(conn_a, conn_b)
        roots = setup.roots | {"postgres": server.postmaster_pid}
        # A publishes the backlog while B does not exist yet: it waits in the stream
        setup.base = setup.start("a", url_a, A_MODULES, log_dir, common)
        await watch.until("the publisher's first publish", lambda: _below(watch, args.orders))
        t0, cpu0 = time.perf_counter(), _cpu(roots | setup.roots)
        left = await watch.count("publish_pending")  # rows published after the poll saw the first ones go
        t1 = await watch.until("the backlog published", lambda: _below(watch, 1))
        cpu1 = _cpu(roots | setup.roots)
        publish = {"publish_per_s": round(left / (t1 - t0), 1) if left else None, "published_in_window": left,
                   "publish_seconds": round(t1 - t0, 3), **_cpu_per_order(cpu0, cpu1, max(1, left))}  # fmt: skip
        await setup.servers["a"].wait_ready(setup.base + "/health/ready")

        async def start() -> None:
            b = setup.start("b", url_b, B_MODULES, log_dir, common)
            await setup.servers["b"].wait_ready(b + "/health/ready")

        result = {
            "publish": publish,
            "drain": await drain(setup, watch, args.orders, start, server.postmaster_pid),
        }
        result["drain"]["place_seconds"] = round(place_s, 2)
        result["lag"] = await lag_steps(
            setup, watch, skus, args.rates, args.duration, server.postmaster_pid, args.orders
        )
        result["pids"] = [p for n, p in setup.roots.items() if p and not n.startswith("nats")]
        return result
    finally:
        setup.stop()
        await conn_a.close()
        await conn_b.close()


async def _below(watch: Watch, n: int) -> bool:
    return await watch.count("publish_pending") < n


# -- report ----------------------------------------------------------------------------------------


def summarise(name: str, rounds: list[dict]) -> dict:
    def med(path: tuple[str, str]) -> float | None:
        values = [r[path[0]][path[1]] for r in rounds if path[0] in r and r[path[0]].get(path[1]) is not None]
        return round(statistics.median(values), 3) if values else None

    out: dict = {"measurement": "broker_summary", "setup": name, "rounds": len(rounds)}
    for key in (
        "charge_per_s",
        "flow_per_s",
        "cpu_ms_per_order_ours",
        "cpu_ms_per_order_postgres",
        "cpu_ms_per_order_total",
        "our_cores",
        "box_cores",
    ):
        out[f"drain_{key}"] = med(("drain", key))
    if any("publish" in r for r in rounds):
        for key in ("publish_per_s", "cpu_ms_per_order_ours", "cpu_ms_per_order_total"):
            out[f"publish_{key}"] = med(("publish", key))
    steps: dict[float, dict] = {}
    for r in rounds:
        for step in r["lag"]:
            s = steps.setdefault(step["rate"], {"hop": [], "flow": [], "hop_p99_by_round": [], "settled": True,
                                                "cpu": [], "box": []})  # fmt: skip
            s["hop"] += step["_hop"]
            s["flow"] += step["_flow"]
            s["hop_p99_by_round"].append(step["hop"]["p99_ms"])
            s["settled"] &= step["settled"] and not step["errors"]
            s["cpu"].append(step.get("cpu_ms_per_order_total"))
            s["box"].append(step.get("box_cores"))
    out["lag"] = [
        {"rate": rate, "orders": len(s["hop"]), "hop": _ms(s["hop"]), "flow": _ms(s["flow"]),
         "hop_p99_by_round": s["hop_p99_by_round"], "settled": s["settled"],
         "cpu_ms_per_order_total": round(statistics.median([c for c in s["cpu"] if c is not None] or [0]), 2),
         "box_cores": round(statistics.median([c for c in s["box"] if c is not None] or [0]), 2)}
        for rate, s in sorted(steps.items())
    ]  # fmt: skip
    return out


def table(summaries: list[dict]) -> str:
    lines = [
        f"{'setup':<12} {'charge/s':>9} {'flow/s':>8} {'publish/s':>9} {'cpu ms/order ours+pg':>21} {'cores ours/box':>15}"
    ]
    for s in summaries:
        cpu = f"{s['drain_cpu_ms_per_order_ours']}+{s['drain_cpu_ms_per_order_postgres']}"
        lines.append(f"{s['setup']:<12} {s['drain_charge_per_s']!s:>9} {s['drain_flow_per_s']!s:>8} "
                     f"{s.get('publish_publish_per_s', '-')!s:>9} {cpu:>21} "
                     f"{str(s['drain_our_cores']) + '/' + str(s['drain_box_cores']):>15}")  # fmt: skip
    lines.append("")
    lines.append(
        f"{'setup':<12} {'rate':>5} {'orders':>6} {'hop p50':>8} {'hop p99':>8} {'flow p50':>9} {'flow p99':>9} {'ms cpu/order':>12} {'box':>5}"
    )
    for s in summaries:
        for step in s["lag"]:
            mark = "" if step["settled"] else "  (did not keep up)"
            lines.append(f"{s['setup']:<12} {step['rate']:>5g} {step['orders']:>6} {step['hop']['p50_ms']!s:>8} "
                         f"{step['hop']['p99_ms']!s:>8} {step['flow']['p50_ms']!s:>9} {step['flow']['p99_ms']!s:>9} "
                         f"{step['cpu_ms_per_order_total']!s:>12} {step['box_cores']!s:>5}{mark}")  # fmt: skip
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    data_dir, ours = env.new_data_dir(args.data_dir)
    out_path = Path(args.out) if args.out else env.RESULTS / f"broker-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    out = Output(out_path)

    def emit(record: dict) -> None:
        out.emit({k: v for k, v in record.items() if not k.startswith("_")})

    server = env.DatabaseServer(data_dir / "pg", os.environ.get("DATABASE_URL"))
    clusters: dict[int, Nats] = {}
    results: dict[str, list[dict]] = {}
    try:
        for nodes in args.nats_nodes:
            clusters[nodes] = await start_nats(nodes, data_dir)
        emit({"measurement": "broker_setup", **env.machine(), "database": await server.settings(),
              "orders": args.orders, "rates": args.rates, "duration": args.duration, "rounds": args.rounds,
              "nats_nodes": args.nats_nodes, "nats_pids": [p for c in clusters.values() for p in c.pids],
              "nats_server": _nats_version()})  # fmt: skip
        logs = data_dir / "logs"
        for round_ in range(1, args.rounds + 1):
            for name in ["in_database"] + [f"across_r{n}" for n in args.nats_nodes]:
                print(f"bench.broker: round {round_}, {name}", file=sys.stderr, flush=True)
                if name == "in_database":
                    found = await run_in_database(server, args, logs)
                else:
                    nodes = int(name.removeprefix("across_r"))
                    found = await run_across(server, clusters[nodes], name, args, logs)
                found["loadavg"] = [round(x, 2) for x in os.getloadavg()]
                results.setdefault(name, []).append(found)
                emit({"measurement": "broker_round", "setup": name, "round": round_,
                      **{k: v for k, v in found.items() if k != "lag"}})  # fmt: skip
                for step in found["lag"]:
                    emit({"measurement": "broker_lag", "setup": name, "round": round_, **step})
        summaries = [summarise(name, rounds) for name, rounds in results.items()]
        for s in summaries:
            emit(s)
        print(table(summaries))
        return 0
    finally:
        for cluster in clusters.values():
            cluster.stop()
        await server.close()
        out.close()
        if ours and not args.keep:
            import shutil

            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--orders", type=int, default=2000, help="the drain's backlog")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[25, 50, 100], help="offered orders/s for the lag"
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per rate")
    parser.add_argument("--rounds", type=int, default=2, help="each setup this many times, alternating")
    parser.add_argument("--nats-nodes", type=int, nargs="+", default=[3, 1], choices=[1, 3],
                        help="3: a 3-node cluster, stream R3; 1: one server, R1 (both: two broker setups)")  # fmt: skip
    parser.add_argument("--data-dir", help="keep the database, NATS stores and logs here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--out", help="the JSON lines file (default bench/results/broker-<time>.jsonl)")
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sys.exit(runner.run(main(parser.parse_args())))
