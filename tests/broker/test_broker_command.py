"""`switchboard broker`: a JetStream server in the foreground, its store under the data dir,
stopped cleanly by SIGTERM or SIGINT; a taken port or a missing binary is one line."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import nats
import pytest

from app.broker import server
from app.broker.server import BinaryMissing, nats_server_binary
from app.broker.stream import ensure_stream
from tests.broker.conftest import wait_gone
from tests.scale.conftest import ROOT, alive, children, free_port
from tests.test_cli_errors import env_for, one_line, run

START_TIMEOUT = 30.0


async def start_broker(data_dir: Path, port: int, *cluster: str, joined: str = "") -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "broker", "--port", str(port), *cluster, cwd=ROOT,
        env=env_for(SWITCHBOARD_DATA_DIR=str(data_dir)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(START_TIMEOUT):
        line = (await process.stdout.readline()).decode()
    assert line == f"switchboard: JetStream broker on nats://127.0.0.1:{port} (store {data_dir / 'nats'}{joined})\n"
    return process


async def test_three_brokers_given_each_other_as_peers_form_a_cluster_with_replicated_streams(tmp_path: Path):
    ports, cluster_ports = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    processes = []
    try:
        for i in range(3):
            peers = ",".join(str(p) for j, p in enumerate(cluster_ports) if j != i)
            processes.append(await start_broker(
                tmp_path / f"n{i}", ports[i], "--name", f"n{i}", "--cluster-port", str(cluster_ports[i]),
                "--peers", peers, joined=f", cluster port {cluster_ports[i]}",
            ))  # fmt: skip
        nc = await nats.connect([f"nats://127.0.0.1:{p}" for p in ports])
        try:
            js = nc.jetstream()
            async with asyncio.timeout(START_TIMEOUT):  # the meta group elects its leader
                while True:
                    try:
                        info = await ensure_stream(js, replicas=3)
                        break
                    except (nats.errors.Error, nats.js.errors.Error):
                        await asyncio.sleep(0.1)
            assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2
        finally:
            await nc.close()
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
                await process.wait()


async def test_a_cluster_node_needs_its_cluster_port_and_its_peers(tmp_path: Path):
    code, out, err = await run(env_for(SWITCHBOARD_DATA_DIR=str(tmp_path)), "broker", "--peers", "6223")

    assert code == 2 and out == ""
    assert one_line(err) == "switchboard: a cluster node needs both --cluster-port and --peers\n"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_the_broker_serves_jetstream_until_a_signal_stops_it_and_its_server(tmp_path: Path, sig):
    port = free_port()
    process = await start_broker(tmp_path, port)
    servers = children(process.pid)
    try:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        await js.add_stream(name="PROBE", subjects=["probe"])
        assert (await js.publish("probe", b"x")).seq == 1
        await nc.close()
        assert (tmp_path / "nats" / "jetstream").is_dir()

        process.send_signal(sig)
        async with asyncio.timeout(START_TIMEOUT):
            code = await process.wait()

        assert code == 0
        assert servers and not any(alive(pid) for pid in servers)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for pid in servers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_port_in_use_is_one_line_and_nothing_starts(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        code, out, err = await run(env_for(SWITCHBOARD_DATA_DIR=str(tmp_path)), "broker", "--port", str(port))

    assert code == 1 and out == ""
    assert one_line(err) == f"switchboard: port {port} on 127.0.0.1 is already in use (another broker?); choose another with --port\n"
    assert not (tmp_path / "nats").exists()


def test_without_the_binary_the_error_says_what_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(server.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(BinaryMissing, match="nats-server not found: install switchboard with its dependencies"):
        nats_server_binary()


def test_the_binary_is_the_one_installed_beside_this_python():
    assert nats_server_binary() == str(Path(sys.executable).parent / "nats-server")


async def test_a_killed_broker_takes_its_server_with_it(tmp_path: Path):
    process = await start_broker(tmp_path, free_port())
    servers = children(process.pid)

    try:
        process.kill()
        await process.wait()

        assert servers and all(wait_gone(pid) for pid in servers)
    finally:
        for pid in servers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
