"""The 3-node JetStream cluster the broker tests run on: a replicated stream works, and the
fixture leaves no server behind."""

from __future__ import annotations

from pathlib import Path

import nats

from app.broker.server import server_command
from app.broker.stream import stream_ready
from tests.broker.conftest import ready_cluster, stop_cluster
from tests.scale.conftest import alive


async def test_a_stream_with_three_replicas_accepts_a_publish_on_the_cluster(nats_cluster):
    nc = await nats.connect(nats_cluster.urls)
    try:
        js = nc.jetstream()
        info = await js.add_stream(name="PROBE", subjects=["probe.>"], num_replicas=3)
        await stream_ready(js, "PROBE")  # a replicated stream answers publishes once it has a leader
        ack = await js.publish("probe.x", b"hello")

        assert info.config.num_replicas == 3 and ack.seq == 1
        assert len((await js.stream_info("PROBE")).cluster.replicas) == 2
    finally:
        await nc.close()


async def test_stopping_the_cluster_leaves_no_server_running(tmp_path: Path):
    cluster = await ready_cluster(tmp_path / "nats")
    pids = [node.process.pid for node in cluster.nodes]

    stop_cluster(cluster)

    assert not any(alive(pid) for pid in pids)
    assert server_command("127.0.0.1", 1, tmp_path)[1:2] == ["-js"]


async def test_the_event_stream_is_created_once_with_a_replica_on_every_node(nats_cluster):
    from app.broker.stream import DUPLICATE_WINDOW_SECONDS, STREAM, cluster_size, ensure_stream

    nc = await nats.connect(nats_cluster.urls[0])  # one URL given: the others are discovered
    try:
        js = nc.jetstream()
        replicas = cluster_size(nc)
        first = await ensure_stream(js, replicas)
        again = await ensure_stream(js, replicas)  # every process calls it at start

        assert replicas == 3
        assert first.config.num_replicas == again.config.num_replicas == 3
        assert again.config.duplicate_window == DUPLICATE_WINDOW_SECONDS
        assert again.config.subjects == ["switchboard.events.>"]
        assert (await js.stream_info(STREAM)).state.messages == 0
    finally:
        await nc.close()
