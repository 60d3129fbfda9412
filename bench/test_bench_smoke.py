"""Smoke test of the bench harness on a tiny load (about 20 s), so it cannot rot.

Lives with the bench, outside the default `uv run pytest` (testpaths = ["tests"]): run it with
`uv run --group bench pytest bench`, as .ci/run does after the default suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "smoke.jsonl"
    done = subprocess.run(
        # two rates and no ladder budget: the first step runs, the budget then ends the ladder
        [sys.executable, "-m", "bench", "smoke", "--out", str(out), "--data-dir", str(tmp_path / "data")]
        + ["--rates", "20", "40", "--ladder-budget", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = {r["measurement"] for r in records}
    assert {"setup", "p1", "sustained", "sustained_rate", "drain_place", "drain_relay"} <= kinds
    assert {"p2_relay_throughput", "p2_relay_lag", "mediator_cost", "summary"} <= kinds
    assert [(r["rate"], r["target"]) for r in records if r["measurement"] == "p1"] == [
        (20, "switchboard"),
        (20, "baseline"),
    ]
    spent = [r for r in records if r["measurement"] == "p1_budget_spent"]
    assert [(r["target"], r["skipped_rates"]) for r in spent] == [("switchboard", [40]), ("baseline", [40])]
    for step in (r for r in records if r["measurement"] == "p1"):
        # every request answered, none failed: the generator, both servers and the database work
        assert step["completed"] == step["scheduled"] and step["errors"] == 0 and step["non_2xx"] == 0, step
    relay = next(r for r in records if r["measurement"] == "p2_relay_throughput")
    # each row acknowledged once and none left; exactly-once rests on the lease-checked
    # acknowledgement, not on an inbox row per delivery (app/relay/ack.py)
    assert relay["finished"] and relay["delivered"] == relay["events"] and relay["outbox_left"] == 0
    assert relay["inbox_rows"] == 0
    lag = next(r for r in records if r["measurement"] == "p2_relay_lag")
    assert lag["finished"] and lag["delivered"] == lag["events"]
    summary = records[-1]
    assert summary["measurement"] == "summary" and summary["mediator_us"] > summary["direct_call_us"]
    assert "capacity:" in done.stdout and "target relay_throughput" in done.stdout
    # sustained: the whole flow at 20 orders/s, judged with the outbox rows left undelivered
    steps = [r for r in records if r["measurement"] == "sustained"]
    assert [r["rate"] for r in steps] == [20] and steps[0]["passed"], steps
    assert steps[0]["outbox_undelivered_allowed"] == 20 * steps[0]["rows_per_order"]
    assert summary["sustained_rps"] == 20 and summary["outbox_undelivered_at_end"] == 0
    # the rows per order counted from the wiring are what the orders wrote
    assert summary["rows_per_order_measured"] == summary["sustained_rows_per_order"] > 0
    # the async side's CPU per order, both halves measured
    assert summary["async_cpu_ms_per_order"] > 0 and summary["request_cpu_ms_per_order"] > 0
    assert summary["async_deliveries_per_order"] == summary["sustained_rows_per_order"]
    for line in (
        "Issue 14: the whole flow keeps pace",
        "sustained rate",
        "request capacity",
        "async CPU per order",
    ):
        assert line in done.stdout, line


def test_drain_smoke() -> None:
    """bench.drain on 30 orders: both halves, every delivery made, the WAL accounted for."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.drain", "--orders", "30", "--concurrency", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = {r["measurement"]: r for r in map(json.loads, done.stdout.splitlines()) if r}
    place, relay = records["drain_place"], records["drain_relay"]
    assert place["items"] == 30
    assert relay["items"] == 30 * 4 and relay["dead_letters"] == 0  # 4 deliveries per order (orders_view is inline)
    for half in (place, relay):
        assert half["wal_bytes_per_order"] > 0
        assert "Heap/INSERT" in half["wal_records_per_order"]  # pg_walinspect on the embedded server


def test_inprocess_smoke() -> None:
    """bench.inprocess on 30 orders: both apps placed them all and were measured, in turn."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.inprocess", "--orders", "30", "--concurrency", "4", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["app"] for r in records] == ["switchboard", "baseline"]
    for record in records:
        assert record["orders"] == 30 and record["cpu_ms_per_order"] > 0 and record["orders_per_s"] > 0
