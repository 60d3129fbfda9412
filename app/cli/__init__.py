"""The `switchboard` command: serve, migrate, relay, sql, services, outbox, dlq, describe, broker."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from app.cli.broker import add_broker_parser
from app.cli.describe import add_describe_parser
from app.cli.inspect import _resolve, cmd_dlq_list, cmd_dlq_show, cmd_outbox_status, cmd_services
from app.cli.process import Failure, cmd_migrate, cmd_relay, cmd_serve, cmd_sql, find_psql
from app.db import DatabaseUnreachable
from app.migrate import UnknownRevision
from app.settings import Settings, SettingsError, _shown

__all__ = ["find_psql", "main", "parser"]


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help; the epilog's lines as written."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"switchboard: {message} (see `{self.prog} --help`)\n")


def environment() -> str:
    """The epilog: every variable app/settings.py declares, as the README's table shows them."""
    fields = [f for f in dataclasses.fields(Settings) if f.metadata["env"]]
    width = max(len(f.metadata["env"]) for f in fields)
    lines = ["environment variables:"]
    for f in fields:
        doc = f"{f.metadata['doc']} (default: {_shown(f)})".replace("`", "")
        lines.append(f"  {f.metadata['env'].ljust(width)}  {doc}")
    return "\n".join(lines)


def _version() -> str:
    try:
        return version("switchboard")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="switchboard", description=__doc__, epilog=environment(), formatter_class=Formatter)
    p.add_argument("--version", action="version", version=f"switchboard {_version()}")
    p.add_argument("--debug", action="store_true", help="on an error, show the whole traceback")
    sub = p.add_subparsers(dest="command", required=True)

    def command(parent, name: str, **kwargs) -> argparse.ArgumentParser:
        return parent.add_parser(name, formatter_class=Formatter, **kwargs)

    serve = command(sub, "serve", help="run the HTTP API, relay and background tasks")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--workers", type=int, default=1, help="HTTP worker processes")
    serve.add_argument("--modules", help="comma-separated modules to host (default: all)")
    serve.add_argument("--no-migrate", action="store_true", help="do not run migrations on start")
    serve.add_argument("--backlog", type=int, default=4096, help="listen backlog")
    serve.add_argument("--backpressure", type=int, default=20000, help="max connections served at once")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error", "critical"],
                       help="overrides SWITCHBOARD_LOG_LEVEL (default info), for every worker")  # fmt: skip
    serve.set_defaults(fn=cmd_serve)

    migrate = command(sub, "migrate", help="upgrade the schema to head, move it --to a revision, or show its status")
    migrate.add_argument("action", nargs="?", choices=["status"], help="status: current, head and pending revisions")
    migrate.add_argument("--to", metavar="REV", default="head", help="upgrade or downgrade to REV (a revision, head or base)")
    migrate.set_defaults(fn=cmd_migrate)

    relay = command(sub, "relay", help="run only the outbox relay")
    relay.set_defaults(fn=cmd_relay)

    sql = command(sub, "sql", help="open psql on the database in use")
    sql.add_argument("-c", "--command", help="run one SQL command and exit")
    sql.set_defaults(fn=cmd_sql)

    services = command(sub, "services", help="list the registered serving instances")
    services.add_argument("--all", action="store_true", help="also instances that missed their heartbeats")
    services.add_argument("--json", action="store_true")
    services.set_defaults(fn=cmd_services)

    outbox = command(sub, "outbox", help="inspect the outbox").add_subparsers(dest="outbox", required=True)
    status = command(outbox, "status", help="rows by subscriber and status, parked keys")
    status.add_argument("--json", action="store_true")
    status.set_defaults(fn=cmd_outbox_status)

    dlq = command(sub, "dlq", help="dead letters").add_subparsers(dest="dlq", required=True)
    ls = command(dlq, "list", help="list dead letters (parked by default)")
    ls.add_argument("--subscriber")
    ls.add_argument("--status", default="parked", choices=["parked", "replayed", "discarded", "all"], help="which ones")
    ls.add_argument("--limit", type=int, default=100, help="at most this many")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_dlq_list)
    show = command(dlq, "show", help="one dead letter with payload, traceback and history")
    show.add_argument("id", type=int)
    show.set_defaults(fn=cmd_dlq_show)
    for name, action in (("replay", "replay"), ("discard", "discard")):
        cmd = command(dlq, name, help=f"{name} one dead letter, or --all of them")
        cmd.add_argument("id", type=int, nargs="?")
        cmd.add_argument("--all", action="store_true")
        cmd.add_argument("--subscriber", help="with --all: only this subscriber's")
        cmd.set_defaults(fn=lambda a, action=action: _resolve(a, action))
    add_describe_parser(sub)
    add_broker_parser(command, sub)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the command; every failure is one line on stderr and an exit code (the traceback only
    with --debug)."""
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a reader that went away (`| head`) shows up here, not at exit
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # what a shell reports for a command ended by SIGPIPE
    except KeyboardInterrupt:
        return 130
    except Failure as error:
        print(f"switchboard: {error}", file=sys.stderr)
        return error.code
    except (SettingsError, UnknownRevision) as error:  # the operator's input: usage-style exit
        if args.debug:
            raise
        print(f"switchboard: {error}", file=sys.stderr)
        return 2
    except DatabaseUnreachable as error:
        if args.debug:
            raise
        print(f"switchboard: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        if args.debug:
            raise
        detail = " ".join(str(error).split())[:300] or "no detail"
        print(f"switchboard: {args.command} failed: {type(error).__name__}: {detail} (--debug shows the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(parser().parse_args(argv)))
