"""`serve` on a port something already listens on says so in one line and exits, before it starts
a database: granian's SO_REUSEPORT would otherwise bind next to the other server silently."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.scale.conftest import ROOT, Cluster, kill_postmaster

TIMEOUT = 30.0


def serve(port: int, data_dir: Path) -> tuple[int | None, str, str]:
    """Run `switchboard serve --port P` on an embedded database in `data_dir`; (exit code, stdout,
    stderr), exit code None if it was still running after TIMEOUT (then it and its postmaster are
    killed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_") and k != "DATABASE_URL"}
    env["SWITCHBOARD_DATA_DIR"] = str(data_dir)
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=TIMEOUT)
        return process.returncode, out, err
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate(timeout=10)
        return None, out, err
    finally:
        kill_postmaster(data_dir)


def expected(port: int) -> str:
    return (
        f"switchboard: port {port} on 127.0.0.1 is already in use (another switchboard serve?);"
        " choose another with --port"
    )


def assert_refused(port: int, data_dir: Path, result: tuple[int | None, str, str]) -> None:
    code, out, err = result
    assert code is not None, f"serve was still running after {TIMEOUT:g}s:\n{out}\n{err}"
    assert code != 0
    assert err.splitlines() == [expected(port)], err
    assert "serving on" not in out
    assert not data_dir.exists(), "serve started the embedded database before checking the port"


def test_serve_refuses_a_port_a_plain_socket_listens_on(tmp_path: Path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        result = serve(port, tmp_path / "data")

    assert_refused(port, tmp_path / "data", result)


async def test_serve_refuses_a_port_another_serve_listens_on(cluster: Cluster, tmp_path: Path):
    first = await cluster.start("first")

    result = await asyncio.to_thread(serve, first.port, tmp_path / "data")

    assert_refused(first.port, tmp_path / "data", result)
    assert first.process is not None and first.process.poll() is None
