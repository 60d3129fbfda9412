"""A 3-node NATS JetStream cluster on loopback ports for the broker tests, and a second database.

`nats_cluster` starts three `nats-server -js` nodes (free ports, one store each under the test's
tmp path, routes to each other), waits until JetStream has a meta leader that knows all three
peers (polled through each node's monitoring endpoint, with a timeout), and stops every node at
teardown, asserting that none is left running. `database_b` is a second database, migrated, the
consuming side of the split (same PostgreSQL server, nothing shared with the session's database).
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from app.broker.server import server_command
from app.db import Database, ensure_database, with_database
from app.migrate import upgrade
from tests.scale import conftest as scale
from tests.scale.conftest import alive, wait_for

# `cluster` (switchboard serve processes) and the hook that prints their output on a failure
cluster = scale.cluster
pytest_runtest_makereport = scale.pytest_runtest_makereport

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class NodeDied(Exception):
    """A node exited before the cluster was ready: its port was taken between listen_port() and its
    bind (other test sessions share the machine), so the cluster starts again on fresh ports."""


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    monitor_port: int
    store: Path
    log_path: Path
    process: subprocess.Popen | None = None
    routes: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, routes: list[int]) -> None:
        self.routes = list(routes)
        command = server_command(
            "127.0.0.1", self.port, self.store, name=self.name, cluster_name="switchboard-test",
            cluster_port=self.cluster_port, routes=routes, monitor_port=self.monitor_port,
        )  # fmt: skip
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it does not end in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL, like a crash: no shutdown, the store left as it was."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """A killed node again: same name, ports, store and routes."""
        assert self.process is not None and self.process.poll() is not None, "kill it first"
        self.start(self.routes)

    async def wait_current(self, session: aiohttp.ClientSession, timeout: float = READY_TIMEOUT) -> None:
        """Until the node's /healthz is ok: running, and its JetStream streams and consumers caught
        up with their leaders."""

        async def healthy() -> bool:
            assert self.process is not None and self.process.poll() is None, f"{self.name} exited"
            try:
                async with session.get(f"http://127.0.0.1:{self.monitor_port}/healthz") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(healthy, timeout, f"{self.name} healthy and current", interval=0.1)


@dataclass
class NatsCluster:
    nodes: list[Node] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def size(self) -> int:
        return len(self.nodes)

    async def wait_for_leader(self, session: aiohttp.ClientSession, timeout: float = READY_TIMEOUT) -> None:
        """Until every node reports a JetStream meta leader and a meta group of all the nodes."""

        async def ready() -> bool:
            died = [n.name for n in self.nodes if n.process is None or n.process.poll() is not None]
            if died:
                raise NodeDied(f"{', '.join(died)} exited while starting:\n{self.log()}")
            for node in self.nodes:
                try:
                    async with session.get(f"http://127.0.0.1:{node.monitor_port}/jsz") as response:
                        jsz = await response.json()
                except (aiohttp.ClientError, ValueError):
                    return False
                meta = jsz.get("meta_cluster") or {}
                if not meta.get("leader") or meta.get("cluster_size") != self.size:
                    return False
                # the leader's view: every other peer current
                if node.name == meta["leader"] and sum(p.get("current", False) for p in meta.get("replicas", [])) < self.size - 1:
                    return False
            return True

        await wait_for(ready, timeout, "a JetStream meta leader over all nodes", interval=0.1)

    def log(self) -> str:
        return "\n".join(f"===== {n.name}\n{n.log_path.read_text()[-4000:]}" for n in self.nodes if n.log_path.exists())


def listen_port() -> int:
    """A free port below the kernel's ephemeral range: a node killed and restarted on its ports
    must find them free, and an ephemeral one can meanwhile be the source port of any outgoing
    connection on the machine (a peer's route reconnecting, another test's client)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def start_cluster(base: Path, size: int = 3) -> NatsCluster:
    cluster = NatsCluster()
    for i in range(size):
        store = base / f"n{i}"
        store.mkdir(parents=True)
        node = Node(f"n{i}", listen_port(), listen_port(), listen_port(), store, base / f"n{i}.log")
        cluster.nodes.append(node)
    for node in cluster.nodes:
        node.start([n.cluster_port for n in cluster.nodes if n is not node])
    return cluster


def stop_cluster(cluster: NatsCluster) -> None:
    for node in cluster.nodes:
        node.stop()
    left = [n.process.pid for n in cluster.nodes if n.process is not None and alive(n.process.pid)]
    assert not left, f"nats-server processes left running: {left}"


async def ready_cluster(base: Path, attempts: int = 3) -> NatsCluster:
    """A started cluster with a leader; on fresh ports again if a node died starting."""
    async with aiohttp.ClientSession() as session:
        for attempt in range(attempts):
            cluster = start_cluster(base / f"try{attempt}")
            try:
                await cluster.wait_for_leader(session)
                return cluster
            except NodeDied:
                stop_cluster(cluster)
                if attempt == attempts - 1:
                    raise
            except BaseException:
                stop_cluster(cluster)
                raise
    raise AssertionError("unreachable")


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    cluster = await ready_cluster(tmp_path / "nats")
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


TEST_DATABASE_B = "switchboard_test_b"


@pytest.fixture(scope="session")
def database_url_b(database_url: str) -> Iterator[str]:
    """A second database on the session's server, migrated: the consuming side's own tables."""
    asyncio.run(ensure_database(with_database(database_url, "postgres"), TEST_DATABASE_B))
    url = with_database(database_url, TEST_DATABASE_B)
    upgrade(url)
    yield url


@pytest.fixture(scope="session")
async def db_b(database_url_b: str) -> AsyncIterator[Database]:
    database = await Database(database_url_b, max_size=10).connect()
    yield database
    await database.close()


@pytest.fixture
async def clean_b(db_b: Database) -> Database:
    """Side B emptied before the test (the session's database is emptied by tests/conftest.py)."""
    tables = await db_b.fetch(
        "SELECT quote_ident(tablename) AS name FROM pg_tables"
        " WHERE schemaname = 'public' AND tablename <> 'alembic_version' ORDER BY tablename"
    )
    await db_b.execute(f"TRUNCATE {', '.join(r['name'] for r in tables)} RESTART IDENTITY")
    return db_b


def wait_gone(pid: int, timeout: float = STOP_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # a process exiting: not a test's synchronisation
    return not alive(pid)

