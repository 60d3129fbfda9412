"""Real `switchboard serve` processes on real sockets, sharing the session's test database.

`cluster.start(name, modules=...)` runs `python -m app serve --port P --no-migrate` in its own
process group (granian forks a worker: a SIGKILL must reach the whole group), with short
heartbeats, deadlines, breaker resets, leases and retries, and waits for `/health/ready`. Every
process is killed at teardown; each one's output goes to a file, printed when the test failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[2]

INTERNAL_TOKEN = "scale-internal-token"
ADMIN_TOKEN = "scale-admin-token"
HEARTBEAT = 0.5  # seconds between registry heartbeats; stale after 3
TIMEOUT = 2.0  # the mediator's deadline
BREAKER_FAIL_MAX = 3
BREAKER_RESET = 2.0
RELAY_LEASE = 2.0
START_TIMEOUT = 30.0

SETTINGS = {
    "SWITCHBOARD_INTERNAL_TOKEN": INTERNAL_TOKEN,
    "SWITCHBOARD_ADMIN_TOKEN": ADMIN_TOKEN,
    "SWITCHBOARD_HEARTBEAT": str(HEARTBEAT),
    "SWITCHBOARD_BREAKER_RESET": str(BREAKER_RESET),
    "SWITCHBOARD_BREAKER_FAIL_MAX": str(BREAKER_FAIL_MAX),
    "SWITCHBOARD_TIMEOUT": str(TIMEOUT),
    "SWITCHBOARD_RETRY_BASE": "0.01",
    "SWITCHBOARD_RETRY_CAP": "0.1",
    "SWITCHBOARD_RELAY_LEASE": str(RELAY_LEASE),
    "SWITCHBOARD_RELAY_POLL": "0.1",
    "SWITCHBOARD_OUTBOX_RETENTION": "3600",  # delivered rows stay in `outbox` for the checks
    "SWITCHBOARD_DB_POOL_SIZE": "10",  # 3 replicas + the test's pool stay under max_connections
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_for(
    condition: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)


def _running_in_group(pgid: int) -> bool:
    """Is a live (not zombie) process in process group `pgid`? (Linux /proc; elsewhere: killpg.)"""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


class Server:
    """One `switchboard serve` process group."""

    def __init__(self, name: str, port: int, modules: str | None, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.port = port
        self.modules = modules
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.instance_id: str | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        command = [sys.executable, "-m", "app", "serve", "--port", str(self.port), "--no-migrate"]
        if self.modules:
            command += ["--modules", self.modules]
        self.starts += 1
        with self.log_path.open("a") as log:
            log.write(f"\n===== {self.name} start #{self.starts}: {' '.join(command)}\n")
            log.flush()
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.process and self.process.returncode}):\n{self.log()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(f"{self.url}/health/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        self.instance_id = (await r.json())["instance"]
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready after {timeout:g}s:\n{self.log()}")
            await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group (granian's supervisor and its worker), like a crash."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self._wait_group_dead()

    def _wait_group_dead(self, timeout: float = 10.0) -> None:
        """Until no process of the group runs any more (a killed worker stays a zombie until init
        reaps it, which can take a second here; a zombie holds no socket)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while _running_in_group(self.process.pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: processes of group {self.process.pid} survived SIGKILL")
            time.sleep(0.01)  # the kernel delivering SIGKILL: not a test's synchronisation

    def log(self, tail: int = 20000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:]


class Cluster:
    def __init__(self, database_url: str, logs: Path, session: aiohttp.ClientSession) -> None:
        self.database_url = database_url
        self.logs = logs
        self.http = session
        self.servers: list[Server] = []

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        env.update(SETTINGS, DATABASE_URL=self.database_url, PYTHONUNBUFFERED="1")
        env.update(overrides)
        return env

    async def start(
        self, name: str, modules: str | None = None, port: int | None = None, env: dict[str, str] | None = None
    ) -> Server:
        server = Server(name, port or free_port(), modules, self.env(**(env or {})), self.logs / f"{name}.log")
        self.servers.append(server)
        server.spawn()
        await server.wait_ready(self.http)
        return server

    async def start_many(
        self, names: list[str], modules: str | None = None, env: dict[str, str] | None = None
    ) -> list[Server]:
        servers = [Server(n, free_port(), modules, self.env(**(env or {})), self.logs / f"{n}.log") for n in names]
        self.servers.extend(servers)
        for server in servers:
            server.spawn()
        await asyncio.gather(*(s.wait_ready(self.http) for s in servers))
        return servers

    async def restart(self, server: Server) -> None:
        """Start a (killed) server again on the same port."""
        assert server.process is None or server.process.poll() is not None, "kill it first"
        server.spawn()
        await server.wait_ready(self.http)

    def switchboard(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """The `switchboard` CLI against the cluster's database (blocking: run it in a thread)."""
        return subprocess.run(
            [sys.executable, "-m", "app", *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def close(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.kill()


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Remember a failed setup or call: the `cluster` fixture prints the servers' output then."""
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture
async def cluster(request, database_url: str, db, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Servers on the session's database (its tables emptied first: this fixture uses `db`)."""
    connector = aiohttp.TCPConnector(limit=200, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        cluster = Cluster(database_url, tmp_path, session)
        try:
            yield cluster
        finally:
            cluster.close()
            if request.node.stash.get(FAILED, False):
                for server in cluster.servers:
                    print(f"\n----- output of {server.name} (port {server.port}, {server.log_path}) -----")
                    print(server.log())


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request; returns (status, headers, decoded JSON body or text)."""
    async with session.request(
        method, url, json=json_body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as response:
        text = await response.text()
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = text
        return response.status, dict(response.headers), body


def order_body(sku: str, quantity: int, payment_method: str, customer: str = "c-1") -> dict[str, Any]:
    return {"customer_id": customer, "items": [{"sku": sku, "quantity": quantity}], "payment_method": payment_method}


def alive(pid: int) -> bool:
    """Does `pid` run (a zombie, killed but not yet reaped, does not)? (Linux /proc.)"""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def children(pid: int) -> set[int]:
    """The live child processes of `pid` (Linux /proc: each thread lists the children it forked)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found.update(int(child) for child in task.read_text().split())
    return {child for child in found if alive(child)}


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid in the embedded server's postmaster.pid under `data_dir`, if the file is there."""
    try:
        return int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def kill_postmaster(data_dir: Path, timeout: float = 10.0) -> bool:
    """Teardown: stop a postmaster the test's processes left running (SIGQUIT: immediate shutdown,
    then SIGKILL). The postmaster detaches from its starter's process group, so killing the group
    does not reach it. Returns whether one was running."""
    pid = postmaster_pid(data_dir)
    if pid is None or not alive(pid):
        return False
    for sig, wait in ((signal.SIGQUIT, timeout), (signal.SIGKILL, timeout)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # the postmaster shutting down: not a test's synchronisation
        if not alive(pid):
            break
    return True


class EmbeddedServer(Server):
    """`switchboard serve` on its own embedded PostgreSQL in `data_dir` (no DATABASE_URL),
    migrating it on start. `stop()` is a clean SIGTERM; teardown kills whatever is left,
    the postmaster included."""

    def __init__(self, name: str, port: int, data_dir: Path, env: dict[str, str], log_path: Path, workers: int = 1):
        env = {k: v for k, v in env.items() if k != "DATABASE_URL"} | {"SWITCHBOARD_DATA_DIR": str(data_dir)}
        super().__init__(name, port, None, env, log_path)
        self.data_dir = data_dir
        self.workers = workers

    def spawn(self) -> None:
        command = [sys.executable, "-m", "app", "serve", "--port", str(self.port), "--workers", str(self.workers)]
        self.starts += 1
        with self.log_path.open("a") as log:
            log.write(f"\n===== {self.name} start #{self.starts}: {' '.join(command)}\n")
            log.flush()
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def workers_pids(self) -> set[int]:
        assert self.process is not None
        return children(self.process.pid)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the main process (granian stops its workers, `serve` its database); its exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        super().kill()
        kill_postmaster(self.data_dir)


async def start_embedded(
    cluster: Cluster, name: str, data_dir: Path, workers: int = 1, port: int | None = None
) -> EmbeddedServer:
    """Start an EmbeddedServer in the cluster (so its teardown kills it) and wait until it is ready."""
    env = {k: v for k, v in cluster.env().items() if k != "DATABASE_URL"}
    server = EmbeddedServer(name, port or free_port(), data_dir, env, cluster.logs / f"{name}.log", workers)
    cluster.servers.append(server)
    server.spawn()
    await server.wait_ready(cluster.http, timeout=START_TIMEOUT * 2)
    return server
