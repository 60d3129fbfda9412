"""bench.drain --statements and --pg: the embedded server restarted with pg_stat_statements
preloaded and the settings given, and the drain half's statements listed by total time."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.drain import DELIVERIES_PER_ORDER
from bench.env import ROOT


def test_drain_lists_the_drain_halfs_statements_by_total_time() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.drain", "--orders", "20", "--concurrency", "4", "--statements", "40",
         "--pg", "wal_buffers=8MB", "--pg", "commit_delay=10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = {r["measurement"]: r for r in map(json.loads, done.stdout.splitlines()) if r}
    assert records["drain_relay"]["items"] == 20 * DELIVERIES_PER_ORDER  # counted from the wiring
    # wal_buffers takes effect only at a restart, which preloading pg_stat_statements needs too
    assert records["drain_relay"]["server_settings"] == {"wal_buffers": "8MB", "commit_delay": "10"}
    statements = records["drain_statements"]["statements"]
    totals = [s["total_ms"] for s in statements]
    assert totals == sorted(totals, reverse=True)
    claim = next(s for s in statements if s["query"].startswith("WITH due AS"))  # the relay's claim
    assert claim["calls"] >= 1 and claim["rows"] >= 1
    assert "total ms" in done.stderr  # the readable table
