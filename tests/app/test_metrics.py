"""The mediator's collector is registered by whoever builds the app, once per registry, never on import."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client import CollectorRegistry, generate_latest

from app.main import create_app
from app.metrics import METRICS, MediatorMetrics
from app.settings import Settings


def test_importing_the_kernel_registers_nothing_on_the_global_registry():
    script = (
        "import app.main, app.bootstrap, app.mediator, app.metrics\n"
        "from prometheus_client import REGISTRY\n"
        "from app.metrics import METRICS\n"
        "print(METRICS in REGISTRY._collector_to_names)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "False"


def test_registering_twice_on_one_registry_registers_once():
    metrics, registry = MediatorMetrics(), CollectorRegistry()
    metrics.of("m", "Ping").record("ok", 0.001)

    metrics.register(registry)
    metrics.register(registry)

    assert generate_latest(registry).decode().count('switchboard_mediator_calls_total{message="Ping"') == 4


def test_building_several_apps_in_one_process_registers_the_collector_once():
    create_app(Settings(instance_id="first"), run_relay=False)
    create_app(Settings(instance_id="second"), run_relay=False)

    METRICS.of("apps", "Built").record("ok", 0.001)

    text = generate_latest().decode()  # a second registration would have raised: duplicated series
    assert text.count('switchboard_mediator_calls_total{message="Built",module="apps",outcome="ok"} 1.0') == 1
