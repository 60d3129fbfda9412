"""P1: `POST /orders` at stepped open-loop rates, switchboard (full flow: mediator, inventory
reservation, OrderPlaced + outbox, relay and async handlers running in the same process) and the
baseline (bench/baseline.py), one after the other on the same machine, each on a fresh database
seeded the same way."""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from bench import env
from bench.loadgen import SERVER_IDLE_CLOSE_S, LoadGenerator, StepResult

P99_LIMIT_MS = 200.0


@dataclass
class P1Config:
    connections: int
    rates: list[float]
    duration: float
    warmup: float
    drain_timeout: float
    skus: int
    stock_per_sku: int
    refine: bool  # after the first failure, one more step halfway down
    backlog: int
    backpressure: int
    workers: int = 1
    profile: bool = False  # py-spy the server during every measured step
    retry_failed: bool = True  # a failed rate is tried once more before it ends the ladder
    # Seconds a target's ladder may take (steps, retries and the waits for quiet between them):
    # once spent, no further step starts. None: no limit. quick sets one to stay under 3 minutes.
    ladder_budget: float | None = None
    # Sustained (bench/sustained.py): a step passes only if, besides the P1 criterion, at most
    # `backlog_seconds` x rate x `rows_per_order` outbox rows are undelivered at its end; each
    # step starts once the previous one's rows are delivered. None: P1 (requests only).
    rows_per_order: float | None = None
    backlog_seconds: float = 1.0
    measurement: str = "p1"


def passed(result: StepResult) -> bool:
    return (
        result.errors == 0
        and result.non_2xx == 0
        and result.completed == result.scheduled
        and result.p99_ms < P99_LIMIT_MS
    )


def order_requests(host: str, skus: list[str], seed: int = 1) -> Callable[[], bytes]:
    """One POST /orders per call: a random SKU (uniform over all of them), quantity 1, a card
    that captures (so payments, inventory and notifications all react)."""
    rnd = random.Random(seed)
    counter = itertools.count()
    head = f"POST /orders HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {{}}\r\n\r\n"
    pick = rnd.randrange
    n = len(skus)

    def make() -> bytes:
        body = (
            f'{{"customer_id":"c-{next(counter)}","items":[{{"sku":"{skus[pick(n)]}","quantity":1}}],'
            '"payment_method":"pm_card_ok"}'
        ).encode()
        return head.format(len(body)).encode() + body

    return make


DB_STATS_SQL = """
SELECT xact_commit, xact_rollback, (SELECT count(*) FROM outbox WHERE status = 'pending') AS outbox_pending,
       (SELECT count(*) FROM outbox WHERE status <> 'delivered') AS outbox_rows
FROM pg_stat_database WHERE datname = current_database()
"""


async def _db_stats(conn: asyncpg.Connection) -> dict:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(DB_STATS_SQL)
    return dict(row)


async def run_target(
    target: str,
    server: env.DatabaseServer,
    config: P1Config,
    port: int,
    emit: Callable[[dict], None],
    log_dir,
) -> list[dict]:
    """Start one server, hold the connections, run the ladder, stop it. Returns the step records."""
    url = await server.fresh(f"bench_{config.measurement}_{target.replace('-', '_')}")
    skus = env.sku_names(config.skus)
    await env.seed_stock(url, skus, config.stock_per_sku)
    serve_args = [
        "--port",
        str(port),
        "--workers",
        str(config.workers),
        "--backlog",
        str(config.backlog),
        "--backpressure",
        str(config.backpressure),
    ]
    if target == "switchboard":
        command = env.switchboard_command() + ["serve", "--no-migrate", *serve_args]
    elif target == "baseline":
        command = [sys.executable, "-m", "bench.baseline", *serve_args]
    else:  # "switchboard-norelay": diagnosis only (bench/serve.py)
        command = [sys.executable, "-m", "bench.serve", "bench.serve:switchboard_without_relay", *serve_args]
    proc = env.ServerProcess(target, command, env.server_env(url), log_dir / f"{target}.log")
    base = f"http://127.0.0.1:{port}"
    proc.start()
    try:
        await proc.wait_ready(base + "/health/ready")
        if target.startswith("switchboard"):  # the seeded stock reads back through the app
            level = await asyncio.to_thread(env.get_json, f"{base}/inventory/items/{skus[0]}")
            assert level["available"] == config.stock_per_sku, level
        roots = {"server": proc.pid, "postgres": server.postmaster_pid}
        return await run_ladder(target, base, url, skus, roots, config, emit, server_pid=proc.pid)
    finally:
        await asyncio.sleep(0.2)
        code = await asyncio.to_thread(proc.stop)
        if code not in (0, None, -15):
            print(f"{target} exited with {code}; log tail:\n{proc.tail()}", file=sys.stderr)


async def run_ladder(
    target: str,
    base: str,
    url: str,
    skus: list[str],
    roots: dict[str, int | None],
    config: P1Config,
    emit: Callable[[dict], None],
    server_pid: int | None = None,
) -> list[dict]:
    """Hold the connections to `base` (one server, or nginx in front of several) and climb the
    ladder. `roots` name the process trees whose CPU each step reports; those other than
    "postgres" are waited on to go quiet between steps. Returns the step records."""
    quiet_pids = [pid for name, pid in roots.items() if name != "postgres" and pid]
    records: list[dict] = []
    stats_conn = None
    gen = None
    measurement = config.measurement
    host = base.removeprefix("http://")
    try:
        stats_conn = await asyncpg.connect(url)
        gen = LoadGenerator(base + "/orders", order_requests(host, skus), connections=config.connections)
        opened = await gen.connect()
        emit({"measurement": f"{measurement}_connect", "target": target, "server_pid": server_pid, **opened})
        if opened["connections_open"] < config.connections:
            print(
                f"warning: {target}: only {opened['connections_open']} of {config.connections} connections opened",
                file=sys.stderr,
            )
        meter = env.CpuMeter(roots)
        if config.warmup > 0:
            warm = await gen.run_step(config.rates[0], config.warmup, drain_timeout=config.drain_timeout)
            emit({"measurement": f"{measurement}_warmup", "target": target, **_brief(warm)})
        plan = sorted(config.rates)
        tested: list[tuple[float, bool]] = []
        refined = False
        cooldown = 0.0
        attempts: dict[float, int] = {}
        ladder_started = time.perf_counter()

        async def settle() -> float:
            limit = _quiet_limit(config, ladder_started)
            if config.rows_per_order is None:
                return await _quiet(quiet_pids, limit=limit)
            # sustained: judged on the database, not guessed from the server's CPU (on a
            # saturated machine the server stays below any threshold while its relay still works)
            return await _delivered(stats_conn, limit=limit)

        if config.rows_per_order is not None and config.warmup > 0:
            cooldown = await settle()
        while plan:
            spent = time.perf_counter() - ladder_started
            if config.ladder_budget is not None and tested and spent > config.ladder_budget:
                emit(
                    {
                        "measurement": f"{measurement}_budget_spent",
                        "target": target,
                        "seconds": round(spent, 1),
                        "skipped_rates": plan,
                    }
                )
                break
            rate = plan.pop(0)
            attempts[rate] = attempts.get(rate, 0) + 1
            # keep the count: reopen what was lost, and what the server would close mid-step
            opened = await gen.refresh(max(0.0, SERVER_IDLE_CLOSE_S - config.duration - IDLE_MARGIN_S))
            if opened["connections_reopened"] or opened["connections_open"] < config.connections:
                emit({"measurement": f"{measurement}_reconnect", "target": target, **opened})
            before = await _db_stats(stats_conn)
            spy = (
                await _start_profile(
                    server_pid,
                    config.duration,
                    env.RESULTS / f"profile-{target}-{rate:g}-{time.strftime('%H%M%S')}.txt",
                )
                if config.profile and server_pid
                else None
            )
            waits = asyncio.create_task(_sample_waits(url))
            meter.start()
            result = await gen.run_step(rate, config.duration, drain_timeout=config.drain_timeout)
            cpu = meter.stop()
            if "cpu_server" not in cpu:  # several replicas (bench.replicas_knee): their sum too
                cpu["cpu_server"] = round(sum(v for k, v in cpu.items() if k.startswith("cpu_server_")), 3)
            waits.cancel()
            db_waits = await waits
            after = await _db_stats(stats_conn)
            if spy is not None:
                emit(
                    {
                        "measurement": f"{measurement}_profile",
                        "target": target,
                        "rate": rate,
                        **await _finish_profile(*spy),
                    }
                )
            ok = passed(result)
            record = {
                "measurement": measurement,
                "target": target,
                **result.as_dict(),
                **cpu,
                "db_commits_per_s": round(
                    (after["xact_commit"] - before["xact_commit"]) / result.wall_seconds, 1
                ),
                "db_commits_per_request": round(
                    (after["xact_commit"] - before["xact_commit"]) / max(result.completed, 1), 2
                ),
                "outbox_pending_before": before["outbox_pending"],
                "outbox_pending_after": after["outbox_pending"],
                "db_active_sessions": db_waits,
                "cooldown_before_s": round(cooldown, 1),
                "refinement": refined and rate not in config.rates,
                "attempt": attempts[rate],
            }
            if config.rows_per_order is not None:
                allowed = config.backlog_seconds * rate * config.rows_per_order
                record.update(
                    requests_passed=ok,
                    outbox_undelivered_before=before["outbox_rows"],
                    outbox_undelivered_after=after["outbox_rows"],
                    outbox_undelivered_allowed=round(allowed),
                    rows_per_order=config.rows_per_order,
                )
                ok = ok and after["outbox_rows"] <= allowed
            record["passed"] = ok
            emit(record)
            records.append(record)
            tested.append((rate, ok))
            cooldown = 0.0
            if ok:
                if config.rows_per_order is not None:  # the next step starts with the outbox delivered
                    cooldown = await settle()
                else:
                    await asyncio.sleep(1.0)
                continue
            # This machine is shared and noisy: a failed rate gets one more try, once the server
            # has gone quiet again, and fails only if that fails too (both targets alike).
            if attempts[rate] == 1 and config.retry_failed:
                cooldown = await settle()
                plan.insert(0, rate)
                continue
            # The first failure ends the ladder, after at most one step between the highest
            # passing rate (or 0) and this one, once the server has gone quiet again.
            if config.refine and not refined:
                low = max((r for r, good in tested if good), default=0.0)
                mid = round((low + rate) / 2 / 25) * 25
                if low < mid < rate:
                    refined = True
                    cooldown = await settle()
                    plan = [mid]
                    continue
            break
    finally:
        if gen is not None:
            gen.close()
        if stats_conn is not None:
            await stats_conn.close()
    return records


def capacity(records: list[dict]) -> dict:
    """Highest passing rate such that every lower rate tested passed too (a rate passes when one
    of its attempts passed)."""
    passed: dict[float, bool] = {}
    for r in records:
        passed[r["rate"]] = passed.get(r["rate"], False) or r["passed"]
    best = 0.0
    lower_bound = False
    for rate in sorted(passed):
        if not passed[rate]:
            break
        best = rate
    top = max((r["rate"] for r in records), default=0.0)
    if records and best == top:
        lower_bound = True  # the ladder never found the limit
    return {"capacity_rps": best, "capacity_is_lower_bound": lower_bound}


def _brief(result: StepResult) -> dict:
    d = result.as_dict()
    keep = ("rate", "duration", "scheduled", "completed", "errors", "non_2xx", "p50_ms", "p99_ms", "max_ms")
    return {k: d[k] for k in keep}


WAITS_SQL = """
SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') AS what, state, count(*) AS n
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND state NOT IN ('idle')
  AND backend_type = 'client backend' AND coalesce(wait_event, '') <> 'ClientRead'
GROUP BY 1, 2
"""


async def _sample_waits(url: str, every: float = 0.05) -> dict:
    """Average active sessions of the database by what they wait on (CPU = running or runnable),
    sampled from pg_stat_activity every 50 ms: where the database's time goes during a step."""
    conn = await asyncpg.connect(url)
    totals: dict[str, int] = {}
    samples = 0
    try:
        while True:
            for row in await conn.fetch(WAITS_SQL):
                key = row["what"] if row["state"] == "active" else f"{row['state']}:{row['what']}"
                totals[key] = totals.get(key, 0) + row["n"]
            samples += 1
            await asyncio.sleep(every)
    except asyncio.CancelledError:
        pass
    finally:
        await conn.close()
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:8]
    return {k: round(v / max(samples, 1), 2) for k, v in top}


# How long a retry or the step between waits for the server to go quiet: long enough for the
# relay to drain what an overloaded step left (70k outbox rows at ~5k deliveries/s: ~15 s), so
# the step starts from the same state as the first try -- not with a backlog about to outgrow
# the relay's yield budget (SWITCHBOARD_RELAY_YIELD) in the middle of it.
QUIET_LIMIT_S = 90.0
IDLE_MARGIN_S = 2.0  # a refreshed connection stays this far below the server's idle limit in a step


def _quiet_limit(config: P1Config, ladder_started: float) -> float:
    """How long to wait for quiet: QUIET_LIMIT_S, or what is left of the ladder's budget."""
    if config.ladder_budget is None:
        return QUIET_LIMIT_S
    return max(0.0, min(QUIET_LIMIT_S, config.ladder_budget - (time.perf_counter() - ladder_started)))


async def _quiet(pids: list[int], limit: float, below: float = 0.15) -> float:
    """Wait until the server trees use < `below` cores (each) over half a second (the queue left
    by an overloaded step is drained, the relay caught up), at most `limit` s. Returns the wait."""
    started = time.perf_counter()
    roots = {str(pid): pid for pid in pids}
    while time.perf_counter() - started < limit:
        a = sum(env.tree_cpu(roots).values())
        await asyncio.sleep(0.5)
        if sum(env.tree_cpu(roots).values()) - a < below * 0.5 * max(len(pids), 1):
            break
    return time.perf_counter() - started


DELIVERABLE_SQL = "SELECT count(*) FROM outbox WHERE status IN ('pending', 'inflight')"


async def _delivered(conn: asyncpg.Connection, limit: float, every: float = 0.5) -> float:
    """Wait until no outbox row is left to deliver (dead and blocked rows never will be), at most
    `limit` s. A delivery commits the rows it causes with its acknowledgement, so none is left
    to come either. Returns the wait."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit and await conn.fetchval(DELIVERABLE_SQL):  # noqa: ASYNC110 (polls the database)
        await asyncio.sleep(every)
    return time.perf_counter() - started


def _py_spy(path) -> str | None:
    import shutil
    from pathlib import Path

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return spy


async def _start_profile(pid: int, duration: float, path):
    """py-spy (sampling, non-blocking) on the server's worker for one step."""
    spy = _py_spy(path)
    if spy is None:
        return None
    workers = _children(pid) or [pid]  # granian's workers: the main process only supervises
    process = await asyncio.create_subprocess_exec(
        spy,
        "record",
        "--pid",
        str(workers[0]),
        "--nonblocking",
        "--rate",
        "200",
        "--duration",
        str(max(1, int(duration))),
        "--format",
        "raw",
        "-o",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    return process, path


def _children(pid: int) -> list[int]:
    from pathlib import Path

    try:
        return sorted(int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:
        return []


async def _finish_profile(process, path, top: int = 25) -> dict:
    _, err = await process.communicate()
    if process.returncode != 0:
        return {"profile_error": err.decode(errors="replace")[-500:]}
    return {"profile_file": str(path), **summarize_profile(path, top)}


def _trunk(frame: str) -> bool:
    return (
        frame.startswith(("process ", "<module> ", "_run_module_as_main", "_run_code", "main (", "serve ("))
        or "granian/server/" in frame
        or "multiprocessing/" in frame
        or "cmd_serve" in frame
    )


def summarize_profile(path, top: int = 25) -> dict:
    """Collapsed stacks → share of samples per function: self (on top of the stack) and
    inclusive (anywhere in it). Idle samples (the event loop waiting) are counted apart."""
    import re
    from collections import Counter

    strip = re.compile(r":\d+\)$")
    self_, incl = Counter(), Counter()
    total = idle = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [strip.sub(")", fr) for fr in stack.split(";")]
            total += n
            leaf = frames[-1]
            if "run_forever" in leaf or "select (selectors" in leaf or "poll (" in leaf:
                idle += n
            self_[leaf] += n
            for fr in set(frames):
                incl[fr] += n

    def share(counter):
        # the trunk (process, runpy, multiprocessing, granian's worker bootstrap) says nothing
        return [[k, round(100 * v / total, 1)] for k, v in counter.most_common() if not _trunk(k)][:top]

    return {
        "samples": total,
        "idle_pct": round(100 * idle / total, 1) if total else None,
        "top_self_pct": share(self_),
        "top_inclusive_pct": share(incl),
    }


async def loadgen_check(connections: int, rate: float, duration: float, port: int, log_dir) -> dict:
    """The generator against a bare ASGI app under granian: its own CPU at `rate` while holding
    `connections` (issue 5 asks for <= 0.3 core at 1,000 req/s with 10,000 connections)."""
    command = [
        sys.executable,
        "-m",
        "bench.serve",
        "bench.serve:noop_app",
        "--port",
        str(port),
        "--backlog",
        "4096",
        "--backpressure",
        str(max(20000, connections * 2)),
    ]
    proc = env.ServerProcess("noop", command, env.server_env(""), log_dir / "noop.log")
    proc.start()
    gen = None
    try:
        base = f"http://127.0.0.1:{port}/"
        await proc.wait_ready(base)
        gen = LoadGenerator(base, connections=connections)
        opened = await gen.connect()
        result = await gen.run_step(rate, duration, drain_timeout=5)
        return {"measurement": "loadgen_check", **opened, **result.as_dict()}
    finally:
        if gen is not None:
            gen.close()
        await asyncio.to_thread(proc.stop)
