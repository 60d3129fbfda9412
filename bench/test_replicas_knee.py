"""bench.replicas_knee's pieces that need no processes: nginx's config for any N, and Little's law."""

from __future__ import annotations

import re

import pytest

from bench.replicas import TEMPLATE, render_conf
from bench.replicas_knee import little


@pytest.mark.parametrize("ports", [[9001], [9001, 9002, 9003, 9004, 9005]])
def test_the_nginx_config_lists_one_upstream_server_per_replica(ports):
    conf = render_conf(TEMPLATE.read_text(), 9000, ports)

    servers = re.findall(r"^\s*server\s+127\.0\.0\.1:(\d+) max_fails=1 fail_timeout=2s;$", conf, re.MULTILINE)
    assert [int(p) for p in servers] == ports
    assert re.search(r"^\s*listen\s+127\.0\.0\.1:9000 backlog=4096;$", conf, re.MULTILINE)


def test_littles_law_turns_10000_in_flight_at_200_ms_into_replicas_at_a_per_replica_rate():
    assert little(750.0) == {"needed_rps": 50_000.0, "replicas": 67}
