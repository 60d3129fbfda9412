"""The `switchboard` command: serve, migrate, relay, sql, services, outbox, dlq."""

from __future__ import annotations

import argparse
import sys

from app.cli.inspect import _resolve, cmd_dlq_list, cmd_dlq_show, cmd_outbox_status, cmd_services
from app.cli.process import cmd_migrate, cmd_relay, cmd_serve, cmd_sql, find_psql
from app.settings import SettingsError

__all__ = ["find_psql", "main", "parser"]


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
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"],
                       help="overrides SWITCHBOARD_LOG_LEVEL (default info), for every worker")  # fmt: skip
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
