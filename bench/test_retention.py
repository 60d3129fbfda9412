"""Smoke test of bench.retention (about 35 s): a real server, orders with Idempotency-Keys and a
5 s retention for 20 s; the kept tables' rows stay flat while events grow. Run with
`uv run --group bench pytest bench`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.drain import DELIVERIES_PER_ORDER

ROOT = Path(__file__).resolve().parent.parent


def test_retention_smoke(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.retention", "--minutes", str(20 / 60), "--rate", "20"]
        + ["--retention", "5", "--sample", "2", "--judge", "rows", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    samples = [r for r in records if r["measurement"] == "retention_sample"]
    verdict = records[-1]
    assert verdict["measurement"] == "retention_verdict" and verdict["passed"], verdict
    assert len(samples) == 11 and samples[-1]["t"] >= 20
    for table in ("outbox", "inbox", "orders_idempotency"):
        assert verdict[table]["rows_flat"], (table, verdict)
        # bounded by about a retention period of orders, not by everything ever placed
        assert samples[-1][f"{table}_rows"] < 0.5 * verdict["orders"]["sent"] * DELIVERIES_PER_ORDER, (
            table,
            samples[-1],
        )
    assert verdict["orders"]["ok"] == verdict["orders"]["sent"] == 400
    assert verdict["orders"]["retries_same_answer"] == 40
    assert verdict["events_grow"]
