"""Smoke test of bench.broker on a tiny load (about a minute: a 3-node JetStream cluster and three
`switchboard serve` processes start), so the tool cannot rot. Run with `uv run --group bench
pytest bench` (.ci/run does)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.scale.conftest import alive

ROOT = Path(__file__).resolve().parent.parent


def test_broker_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "broker.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "bench.broker", "--orders", "20", "--rates", "10", "--duration", "1"]
        + ["--rounds", "1", "--nats-nodes", "3", "--out", str(out), "--data-dir", str(tmp_path / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    rounds = {r["setup"]: r for r in records if r["measurement"] == "broker_round"}
    assert set(rounds) == {"in_database", "across_r3"}
    # the whole backlog went through on both sides, and the broker's publisher emptied A's outbox
    for found in rounds.values():
        assert found["drain"]["orders"] == 20 and found["drain"]["flow_per_s"] > 0, found
    # (20 rows go in the publisher's first batch, before the poll sees one go: no publish rate)
    assert rounds["across_r3"]["publish"]["published_in_window"] >= 0
    assert rounds["across_r3"]["drain"]["charge_per_s"] > 0
    # every order offered at the steady rate was accepted, charged and completed, its lag measured
    steps = {r["setup"]: r for r in records if r["measurement"] == "broker_lag"}
    assert set(steps) == {"in_database", "across_r3"}
    for step in steps.values():
        assert step["settled"] and step["errors"] == {} and step["incomplete"] == 0, step
        assert step["accepted"] == step["sent"] == 10
        assert 0 < step["hop"]["p50_ms"] <= step["hop"]["p99_ms"] <= step["flow"]["p99_ms"], step
    summaries = [r["setup"] for r in records if r["measurement"] == "broker_summary"]
    assert summaries == ["in_database", "across_r3"]
    assert "hop p99" in done.stdout
    # nothing left running: the servers and the NATS nodes were stopped
    pids = [pid for r in rounds.values() for pid in r["pids"]] + records[0]["nats_pids"]
    assert pids and not [pid for pid in pids if alive(pid)]
