"""The HTTP workers of `serve`: granian processes, each one replaced when it dies."""

from __future__ import annotations


def serve_http(
    host: str, port: int, *, workers: int, backlog: int, backpressure: int, target: str = "app.main:create_app"
) -> None:
    """Run granian on the ASGI app factory `target` until SIGINT/SIGTERM (the benchmarks serve
    their baseline app through this too, so both apps run under the same server settings).

    Without `respawn_failed_workers`, granian answers one worker's death by stopping all the
    others and returning, and `serve` then stops the embedded database it holds: one crashed
    worker took the whole instance down. With it, the dead worker is replaced and the rest keep
    serving on the shared socket. granian still gives up (stops and exits non-zero) when the same
    worker dies again within a few seconds of being replaced: a crash loop, which a restart by the
    process manager is more likely to fix than endless respawns.
    """
    from granian import Granian
    from granian.constants import Interfaces, Loops

    Granian(
        target,
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        workers=workers,
        loop=Loops.uvloop,
        backlog=backlog,
        backpressure=backpressure,
        log_access=False,
        respawn_failed_workers=True,
    ).serve()
