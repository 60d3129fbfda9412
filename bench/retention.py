"""Do the tables stay flat? A real `switchboard serve` takes orders at a steady rate for a while,
with short retention periods, and the bench samples the size of the tables that retention keeps
in check.

    uv run --group bench python -m bench.retention [--minutes 10] [--rate 50] [--retention 30] [--sample 60]

1. A fresh database (embedded PostgreSQL in a temporary folder, or DATABASE_URL's server:
   `bench_retention`, dropped at the end), 1,000 SKUs seeded as in P1.
2. `switchboard serve --no-migrate --workers 1` with SWITCHBOARD_OUTBOX_RETENTION,
   SWITCHBOARD_INBOX_RETENTION and SWITCHBOARD_IDEMPOTENCY_RETENTION all set to `--retention`
   seconds (its relay purges the outbox and inbox, the orders module forgets keys).
3. `POST /orders` at `--rate` per second on schedule (one unit of a random SKU, `pm_card_ok`,
   each with its own Idempotency-Key; every 10th order is sent twice with its key, and the
   retry must get the first answer), for `--minutes`.
4. At the start and every `--sample` seconds: rows (`count(*)`) and bytes
   (`pg_total_relation_size`: heap, indexes, TOAST) of `outbox`, `inbox`, `orders_idempotency`
   and `events`.

Prints one JSON line per sample, then a table and a verdict line (JSON). **Flat** = for outbox,
inbox and orders_idempotency, the last sample's rows are within 20% of the first sample taken at
or after 2 x retention, and the bytes grew by at most 20% (or 256 kB, a few pages per index) over
the run's second half (`verdict` says why not from 2 x retention; `--judge rows`: rows only, for runs too short for autovacuum, whose rounds are a minute
apart, to reclaim the deleted rows' space). `events` grows by design: it is the record. Exit
code 0 only if all three are flat, `events` grew, and every order (and every retry) got its 201.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import asyncpg

from bench import env
from bench.replicas import free_ports

KEPT = ("outbox", "inbox", "orders_idempotency")  # retention keeps these flat
TABLES = (*KEPT, "events")
TOLERANCE = 0.20
BYTES_SLACK = 256 * 1024
RETRY_EVERY = 10  # every 10th order is sent again with its key

SAMPLE_SQL = " UNION ALL ".join(
    f"SELECT '{t}' AS name, (SELECT count(*) FROM {t}) AS rows, pg_total_relation_size('{t}') AS bytes"
    for t in TABLES
)


def say(message: str) -> None:
    print(f"bench.retention: {message}", file=sys.stderr, flush=True)


@dataclass
class Load:
    sent: int = 0
    ok: int = 0
    retries_same: int = 0
    failures: list[str] = field(default_factory=list)


async def sample(conn: asyncpg.Connection, started: float) -> dict:
    rows = await conn.fetch(SAMPLE_SQL)
    record = {"measurement": "retention_sample", "t": round(time.monotonic() - started, 1)}
    for r in rows:
        record[f"{r['name']}_rows"] = r["rows"]
        record[f"{r['name']}_bytes"] = r["bytes"]
    return record


async def order(http: aiohttp.ClientSession, base: str, sku: str, retry: bool, load: Load) -> None:
    body = {"customer_id": "bench", "items": [{"sku": sku, "quantity": 1}], "payment_method": "pm_card_ok"}
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    try:
        answers = []
        for _ in range(2 if retry else 1):
            async with http.post(base + "/orders", json=body, headers=headers) as response:
                text = await response.text()
                if response.status != 201:
                    load.failures.append(f"{response.status}: {text[:200]}")
                    return
                answers.append(json.loads(text))
        load.ok += 1
        if retry:
            if answers[0] == answers[1]:
                load.retries_same += 1
            else:
                load.failures.append(f"a retry got another answer: {answers}")
    except (aiohttp.ClientError, TimeoutError, OSError) as error:
        load.failures.append(f"{type(error).__name__}: {error}")


async def send_orders(base: str, skus: list[str], rate: float, seconds: float, load: Load) -> None:
    """Order i at its scheduled time start + i/rate, whatever the answers before it did."""
    rnd = random.Random(1)
    tasks: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        start = time.monotonic()
        total = int(rate * seconds)
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(order(http, base, rnd.choice(skus), i % RETRY_EVERY == 0, load))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            load.sent += 1
        if tasks:
            await asyncio.wait(tasks)


def verdict(samples: list[dict], retention: float, load: Load, judge: str) -> dict:
    """Rows: the last sample against the first at 2 x retention (the rows then cover a whole
    retention period). Bytes: against the first at half the run, and no earlier: deleted rows'
    space is reused only once a vacuum has run, and autovacuum's rounds are a minute apart, so a
    table's size settles after a few rounds, not after one retention period. A table that grew
    without bound would grow as much in the second half as in the first (as events do)."""
    settled = [s for s in samples if s["t"] >= 2 * retention]
    half = [s for s in settled if s["t"] >= samples[-1]["t"] / 2]
    result: dict = {"measurement": "retention_verdict", "retention_seconds": retention, "judge": judge}
    flat = enough = len(half) >= 2
    if not enough:
        result["why"] = "no two samples after 2 x retention in the run's second half: run longer or sample more often"
    for table in KEPT if enough else ():
        ref, mid, last = settled[0], half[0], settled[-1]
        rows_ok = abs(last[f"{table}_rows"] - ref[f"{table}_rows"]) <= TOLERANCE * max(ref[f"{table}_rows"], 1)
        grown = last[f"{table}_bytes"] - mid[f"{table}_bytes"]
        bytes_ok = grown <= max(TOLERANCE * mid[f"{table}_bytes"], BYTES_SLACK)
        result[table] = {
            "rows": [ref["t"], ref[f"{table}_rows"], last[f"{table}_rows"]],
            "bytes": [mid["t"], mid[f"{table}_bytes"], last[f"{table}_bytes"]],
            "rows_flat": rows_ok,
            "bytes_flat": bytes_ok,
        }
        flat = flat and rows_ok and (bytes_ok or judge == "rows")
    result["events_rows"] = [samples[0]["events_rows"], samples[-1]["events_rows"]]
    result["events_grow"] = samples[-1]["events_rows"] > samples[0]["events_rows"]
    result["orders"] = {"sent": load.sent, "ok": load.ok, "retries_same_answer": load.retries_same}
    result["failures"] = load.failures[:5]
    result["flat"] = flat
    result["passed"] = flat and result["events_grow"] and not load.failures and load.ok == load.sent
    return result


def table(samples: list[dict]) -> str:
    head = f"{'t (s)':>7} " + " ".join(f"{t + ' rows':>24} {'kB':>7}" for t in TABLES)
    lines = [head]
    for s in samples:
        cells = " ".join(f"{s[f'{t}_rows']:>24} {s[f'{t}_bytes'] // 1024:>7}" for t in TABLES)
        lines.append(f"{s['t']:>7} {cells}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    data_dir, ours = env.new_data_dir(args.data_dir)
    server = env.DatabaseServer(data_dir, os.environ.get("DATABASE_URL"))
    proc = None
    try:
        url = await server.fresh("bench_retention")
        skus = env.sku_names(1000)
        await env.seed_stock(url, skus, 1_000_000_000)
        [port] = free_ports(1)
        environment = env.server_env(url)
        for name in ("OUTBOX", "INBOX", "IDEMPOTENCY"):
            environment[f"SWITCHBOARD_{name}_RETENTION"] = str(args.retention)
        command = env.switchboard_command() + ["serve", "--no-migrate", "--port", str(port), "--workers", "1"]
        proc = env.ServerProcess("switchboard", command, environment, data_dir / "logs" / "retention.log")
        proc.start()
        base = f"http://127.0.0.1:{port}"
        await proc.wait_ready(base + "/health/ready")
        say(f"serving on {base}; {args.rate}/s for {args.minutes} min, retention {args.retention} s")
        conn = await asyncpg.connect(url)
        try:
            load = Load()
            started = time.monotonic()
            sender = asyncio.create_task(send_orders(base, skus, args.rate, args.minutes * 60, load))
            samples = [await sample(conn, started)]
            print(json.dumps(samples[-1]), flush=True)
            count = int(args.minutes * 60 / args.sample + 1e-9)
            for k in range(1, count + 1):  # at start + k x --sample, while the orders flow
                await asyncio.sleep(max(0.0, started + k * args.sample - time.monotonic()))
                samples.append(await sample(conn, started))
                print(json.dumps(samples[-1]), flush=True)
            await sender
        finally:
            await conn.close()
        print(table(samples), flush=True)
        result = verdict(samples, args.retention, load, args.judge)
        print(json.dumps(result), flush=True)
        return 0 if result["passed"] else 1
    finally:
        if proc is not None:
            proc.stop()
        await server.close()
        if ours:
            shutil.rmtree(data_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=50.0, help="orders per second")
    parser.add_argument("--retention", type=float, default=30.0, help="seconds, for all three retentions")
    parser.add_argument("--sample", type=float, default=60.0, help="seconds between samples")
    parser.add_argument(
        "--judge",
        choices=("rows+bytes", "rows"),
        default="rows+bytes",
        help="rows: judge row counts only (a run shorter than a few autovacuum rounds, a minute apart)",
    )
    parser.add_argument("--data-dir", help="keep the database and the server's log here")
    args = parser.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
