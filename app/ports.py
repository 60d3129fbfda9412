"""Is the port `serve` was asked for free? Checked before anything else starts."""

from __future__ import annotations

import socket

IN_USE = "switchboard: port {port} on {host} is already in use (another switchboard serve?); choose another with --port"


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on (host, port).

    granian binds with SO_REUSEPORT, so a second `serve` on a served port would bind too and the
    kernel would split connections between the two (with another data dir: two databases). This
    bind sets only SO_REUSEADDR: Linux refuses it next to any listener, while still allowing it
    over the TIME_WAIT connections a server that just stopped leaves behind.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # an unknown host is granian's error to report
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            return True
    return False
