"""The HTTP edge's per-request cost: what every request pays stays plain (app/http.py,
app/http_metrics.py), with the behaviour the API tests pin unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

from litestar._kwargs.kwargs_model import KwargsModel
from litestar.datastructures import URL
from prometheus_client import Histogram

from tests.metrics.scrape import samples, value
from tests.test_order_flow import place, stock

ORDER = {"customer_id": "c-1", "items": [{"sku": "nothing-here", "quantity": 1}], "payment_method": "pm_card_ok"}
ROUTE = {"method": "POST", "route": "/orders", "status": "422"}


async def test_a_request_is_timed_without_a_prometheus_histogram_update(client, monkeypatch):
    def observe(self, *args, **kwargs):
        raise AssertionError("Histogram.observe on the request path")

    monkeypatch.setattr(Histogram, "observe", observe)
    before = value(samples((await client.get("/metrics")).text), "switchboard_http_request_duration_seconds_count", **ROUTE) or 0

    response = await client.post("/orders", json=ORDER)

    assert response.status_code == 422, response.text  # an unknown SKU: a business answer
    after = samples((await client.get("/metrics")).text)
    assert value(after, "switchboard_http_request_duration_seconds_count", **ROUTE) == before + 1


async def test_a_json_body_that_decodes_builds_no_url(client, monkeypatch):
    built = []
    from_scope = URL.from_scope.__func__

    def counted(cls, scope):
        built.append(scope.get("path"))
        return from_scope(cls, scope)

    await stock(client)
    monkeypatch.setattr(URL, "from_scope", classmethod(counted))

    placed = await place(client, "pm_card_ok")
    assert placed.status_code == 201, placed.text
    assert built == []

    invalid = await client.post("/orders", json={**ORDER, "items": []})
    assert invalid.status_code == 400
    assert invalid.json()["title"] == "Validation failed for POST /orders"  # named when it fails


SCRIPT = """
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from app.http_metrics import HTTP_SECONDS
for seconds in (0.0004, 0.003, 0.003, 20.0):
    HTTP_SECONDS.record("POST", "/orders", 201, seconds)
HTTP_SECONDS.flush()
HTTP_SECONDS.record("BREW", None, 404, 0.02)
HTTP_SECONDS.flush()
HTTP_SECONDS.flush()
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
print(generate_latest(registry).decode())
"""


def test_flushed_http_durations_read_back_exactly_in_multiprocess_mode(tmp_path):
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True).stdout

    name = "switchboard_http_request_duration_seconds"
    labels = 'method="POST",route="/orders",status="201"'
    assert f'{name}_bucket{{le="0.001",{labels}}} 1.0' in out
    assert f'{name}_bucket{{le="0.005",{labels}}} 3.0' in out
    assert f'{name}_bucket{{le="10.0",{labels}}} 3.0' in out
    assert f'{name}_bucket{{le="+Inf",{labels}}} 4.0' in out
    assert f"{name}_count{{{labels}}} 4.0" in out
    assert f"{name}_sum{{{labels}}} 20.0064" in out
    assert f'{name}_count{{method="other",route="unmatched",status="404"}} 1.0' in out


async def test_placing_an_order_resolves_no_litestar_dependency(client, monkeypatch):
    await stock(client)

    async def resolve(self, *args, **kwargs):
        raise AssertionError("a dependency resolved for POST /orders")

    monkeypatch.setattr(KwargsModel, "resolve_dependencies", resolve)

    placed = await place(client, "pm_card_ok")

    assert placed.status_code == 201, placed.text
    assert placed.headers["location"] == f"/orders/{placed.json()['order_id']}"
