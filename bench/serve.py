"""Serve an ASGI app factory with granian exactly as `switchboard serve` does: through the same
`app.supervise.serve_http` (ASGI, uvloop, no access log, failed workers respawned, the given
workers, backlog and backpressure).

    python -m bench.serve bench.baseline:create_app --port 8100
    python -m bench.serve bench.serve:switchboard_without_relay --port 8101   # diagnosis only
    python -m bench.serve bench.serve:noop_app --port 8102                    # load generator check
"""

from __future__ import annotations

import argparse


def switchboard_without_relay():
    """Switchboard's app with no relay and no background tasks in the process: the synchronous
    path alone. Not the product (nothing delivers the outbox): only to split P1's cost between
    the request path and the async work running beside it."""
    from app.main import create_app

    return create_app(run_relay=False)


async def _noop(scope, receive, send):
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"{}"})


def noop_app():
    """A bare ASGI app (no framework, no database): what the load generator costs by itself."""
    return _noop


def serve(target: str, host: str, port: int, workers: int, backlog: int, backpressure: int) -> None:
    from app.supervise import serve_http

    serve_http(host, port, workers=workers, backlog=backlog, backpressure=backpressure, target=target)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="module:factory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--backpressure", type=int, default=20000)
    args = p.parse_args(argv)
    serve(args.target, args.host, args.port, args.workers, args.backlog, args.backpressure)


if __name__ == "__main__":
    main()
