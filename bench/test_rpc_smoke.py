"""Smoke test of bench/rpc.py (NATS request-reply vs HTTP) on a tiny load, so it cannot rot:
both transports reach the real inventory server and answer every call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_rpc_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "rpc.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "bench.rpc", "--concurrency", "2", "--duration", "0.3", "--warmup", "0.1",
         "--rounds", "1", "--query-skus", "2", "--reserve-skus", "20", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["measurement"] == "rpc_nats_vs_http"
    for message in ("GetStockLevel", "ReserveStock"):
        sides = record["results"][message]["2"]
        for side in ("local", "http", "nats"):
            assert sides[side]["completed"] > 0 and sides[side]["errors"] == 0, (message, side, sides[side])
        assert sides["nats_over_http_p50_ms"] is not None
    assert "calls/s" in done.stdout
