"""The commands that inspect and operate what is in flight: services, outbox, dlq."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from uuid import UUID

from app.cli.process import Failure, database_url
from app.db import Database
from app.settings import get_settings


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
    if get_settings().outbox_retention_seconds <= 0:  # this process's setting: the cluster's, as a rule
        print("\ndelivered rows: none kept (SWITCHBOARD_OUTBOX_RETENTION=0 deletes a row when it is delivered);"
              " the delivery rate is switchboard_relay_delivered_total on /metrics")
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
        done = await action(db, ids, actor)
        if not done and not args.all:  # say why nothing happened
            letter = await dead_letters.get_dead_letter(db, args.id)
            if letter is None:
                raise Failure(f"no dead letter {args.id}")
            raise Failure(f"dead letter {args.id} is {letter['status']}, not parked: nothing to {action_name}")
        return done

    if not args.all and args.id is None:
        raise Failure("give a dead letter ID or --all", code=2)
    done = _run(go)
    print(f"{action_name}ed {len(done)} dead letter(s): {', '.join(map(str, done)) or '-'}".replace("ee", "e"))
    return 0


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
