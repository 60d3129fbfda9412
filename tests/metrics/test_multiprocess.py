"""Multiprocess mode (what `serve` runs): the mediator's plain numbers, flushed into the shared
files, read back exactly as the single-process collector shows them, however often flushed."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from app.metrics import METRICS, MULTIPROCESS
assert MULTIPROCESS
stats = METRICS.of("m", "Ping")
for seconds in (0.0004, 0.003, 0.003, 7.0):
    stats.record("ok", seconds)
METRICS.flush()
stats.record("rejected", 0.02)
METRICS.flush()
METRICS.flush()
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
print(generate_latest(registry).decode())
"""


def test_flushed_call_stats_read_back_exactly(tmp_path):
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True).stdout

    labels = 'message="Ping",module="m"'
    assert f'switchboard_mediator_calls_total{{{labels},outcome="ok"}} 4.0' in out
    assert f'switchboard_mediator_calls_total{{{labels},outcome="rejected"}} 1.0' in out
    assert f'switchboard_mediator_calls_total{{{labels},outcome="error"}} 0.0' in out
    assert f'switchboard_mediator_seconds_bucket{{le="0.0005",{labels}}} 1.0' in out
    assert f'switchboard_mediator_seconds_bucket{{le="0.005",{labels}}} 3.0' in out
    assert f'switchboard_mediator_seconds_bucket{{le="0.025",{labels}}} 4.0' in out
    assert f'switchboard_mediator_seconds_bucket{{le="5.0",{labels}}} 4.0' in out
    assert f'switchboard_mediator_seconds_bucket{{le="+Inf",{labels}}} 5.0' in out
    assert f"switchboard_mediator_seconds_count{{{labels}}} 5.0" in out
    assert f"switchboard_mediator_seconds_sum{{{labels}}} 7.0264" in out
