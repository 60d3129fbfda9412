"""The 3-node JetStream cluster the broker tests run on: a replicated stream works, and the
fixture leaves no server behind."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import nats

from app.broker.server import server_command
from tests.broker.conftest import start_cluster, stop_cluster
from tests.scale.conftest import alive


async def test_a_stream_with_three_replicas_accepts_a_publish_on_the_cluster(nats_cluster):
    nc = await nats.connect(nats_cluster.urls)
    try:
        js = nc.jetstream()
        info = await js.add_stream(name="PROBE", subjects=["probe.>"], num_replicas=3)
        ack = await js.publish("probe.x", b"hello")

        assert info.config.num_replicas == 3 and ack.seq == 1
        assert len((await js.stream_info("PROBE")).cluster.replicas) == 2
    finally:
        await nc.close()


async def test_stopping_the_cluster_leaves_no_server_running(tmp_path: Path):
    cluster = start_cluster(tmp_path / "nats")
    async with aiohttp.ClientSession() as session:
        await cluster.wait_for_leader(session)
    pids = [node.process.pid for node in cluster.nodes]

    stop_cluster(cluster)

    assert not any(alive(pid) for pid in pids)
    assert server_command("127.0.0.1", 1, tmp_path)[1:2] == ["-js"]
