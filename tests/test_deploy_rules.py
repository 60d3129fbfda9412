"""deploy/: the Prometheus alert rules pass promtool's check and their unit tests, and the alerts
and the Grafana dashboard name only series a real scrape of the app has."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.metrics.scrape import sample_names
from tests.test_order_flow import dead_letters, drain_until, stocked_order

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus"
NAME = re.compile(r"\bswitchboard_[a-z0-9_]+")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool not found: install Debian's `prometheus` package (.ci/run does)")
        pytest.skip("promtool not found: apt-get install prometheus (Debian package) to run it")
    return found


@pytest.mark.parametrize("args", [["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]])
def test_promtool_accepts_the_rules(args):
    result = subprocess.run([promtool(), *args], cwd=RULES, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_scrape_config():
    result = subprocess.run(
        [promtool(), "check", "config", "prometheus.yml"], cwd=RULES, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


BROKER = "switchboard_broker_"  # exported only with SWITCHBOARD_NATS_URL


def referenced() -> dict[str, set[str]]:
    alerts = yaml.safe_load((RULES / "alerts.yml").read_text())
    dashboard = json.loads((DEPLOY / "grafana" / "switchboard.json").read_text())
    exprs = {
        "alerts.yml": [rule["expr"] for group in alerts["groups"] for rule in group["rules"]],
        "switchboard.json": [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]],
    }
    return {where: {n for e in found for n in NAME.findall(e)} for where, found in exprs.items()}


async def test_every_series_the_alerts_and_the_dashboard_use_is_in_a_real_scrape(client, app_relay, db):
    await stocked_order(client, "pm_card_broken")  # a delivery, failures, a dead letter: every family

    async def parked() -> bool:
        return len(await dead_letters(db)) == 1

    await drain_until(app_relay, parked)
    client.app.state.metrics.database.read_at = None
    scraped = sample_names((await client.get("/metrics")).text)

    for where, names in referenced().items():
        assert names, f"{where} names no switchboard series"
        names = {n for n in names if not n.startswith(BROKER)}  # a broker's scrape: tests/broker
        assert names <= scraped, f"{where} names series no scrape has: {sorted(names - scraped)}"
