"""`switchboard broker`: a local JetStream server for development, in the foreground, its store
under the data dir; SIGINT/SIGTERM stop it cleanly (nats-server flushes its store on either)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys

from app.cli.process import Failure
from app.settings import get_settings

# a cluster's nodes start one by one: a peer not up yet is retried by the server, not an error
ROUTE_RETRY = "Error trying to connect to route"


def add_broker_parser(command, sub) -> None:
    broker = command(sub, "broker", help="run a local NATS JetStream server (store under the data dir)")
    broker.add_argument("--host", default="127.0.0.1", help="address to listen on")
    broker.add_argument("--port", type=int, help="port to listen on (default: SWITCHBOARD_BROKER_PORT, 4222)")
    broker.add_argument("--name", default="switchboard", help="this server's name (unique in a cluster)")
    broker.add_argument(
        "--cluster-port", type=int, help="join a cluster: the port its peers reach this node on (with --peers)"
    )
    broker.add_argument(
        "--peers", default="", help="the other nodes' cluster addresses, comma-separated: PORT (on --host) or HOST:PORT"
    )
    broker.set_defaults(fn=cmd_broker)


def cmd_broker(args: argparse.Namespace) -> int:
    from app.broker.server import BinaryMissing, server_command
    from app.ports import port_in_use

    settings = get_settings()
    port = args.port if args.port is not None else settings.broker_port
    if port_in_use(args.host, port):
        raise Failure(f"port {port} on {args.host} is already in use (another broker?); choose another with --port")
    store = settings.data_dir.absolute() / "nats"
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if bool(peers) != (args.cluster_port is not None):
        raise Failure("a cluster node needs both --cluster-port and --peers", code=2)
    if args.cluster_port is not None and port_in_use(args.host, args.cluster_port):
        raise Failure(f"cluster port {args.cluster_port} on {args.host} is already in use; choose another with --cluster-port")
    cluster = {"cluster_name": "switchboard", "cluster_port": args.cluster_port, "routes": peers} if peers else {}
    try:
        command = server_command(args.host, port, store, name=args.name, **cluster)
    except BinaryMissing as error:
        raise Failure(str(error)) from None
    store.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent
    )

    def forward(signum, _frame) -> None:  # the server stops itself cleanly on either signal
        process.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    assert process.stderr is not None
    ready = False
    last = ""
    for line in process.stderr:  # its log: wait for "Server is ready", keep the last line for errors
        last = line.strip()
        if "Server is ready" in line and not ready:
            ready = True
            joined = f", cluster port {args.cluster_port}" if peers else ""
            print(f"switchboard: JetStream broker on nats://{args.host}:{port} (store {store}{joined})", flush=True)
        elif ready and ("[ERR]" in line or "[FTL]" in line) and ROUTE_RETRY not in line:
            print(f"switchboard: broker: {last.split('] ', 1)[-1]}", file=sys.stderr, flush=True)
    code = process.wait()
    if not ready or code not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise Failure(f"nats-server stopped (exit {code}): {last.split('] ', 1)[-1] or 'no output'}")
    return 0


def _die_with_parent() -> None:
    """In the child, before exec (Linux): the server gets SIGTERM when `broker` dies, even by
    SIGKILL, instead of holding the port and the store as an orphan."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
