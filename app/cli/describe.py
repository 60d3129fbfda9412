"""`switchboard describe`: the wiring this process would run, read from the real bootstrap and the
real app's route table rather than from a list kept by hand: modules (hosted here or remote),
commands and queries (handler, deadline), subscriptions (events, retry policy, compensation;
retired ones deliver only old rows and list no events), inline projections, background tasks
and HTTP routes. It connects to no database."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

from app.settings import Settings, get_settings

UNCONNECTED_URL = "postgresql://describe@localhost/describe"  # a pool is never opened on it


def add_describe_parser(sub: argparse._SubParsersAction) -> None:
    describe = sub.add_parser("describe", help="list modules, messages, subscriptions, tasks and routes")
    describe.add_argument("--modules", help="comma-separated modules hosted here (default: SWITCHBOARD_MODULES, or all)")
    describe.add_argument("--json", action="store_true", help="one JSON document, for machines")
    describe.set_defaults(fn=cmd_describe)


def cmd_describe(args: argparse.Namespace) -> int:
    settings = get_settings()
    if args.modules:
        settings = replace(settings, modules=tuple(m.strip() for m in args.modules.split(",") if m.strip()))
    try:
        wiring = describe(settings)
    except (ValueError, TypeError) as error:  # bootstrap refuses the wiring: one line, no traceback
        print(f"switchboard: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(wiring, indent=2))
    else:
        print(render(wiring), end="")
    return 0


def describe(settings: Settings) -> dict[str, Any]:
    """The wiring as plain data. The system is built by `bootstrap()` over a Database that is
    constructed but never connected (bootstrap only keeps it for later), and the routes come
    from `create_app()`, which opens nothing before its lifespan starts."""
    from app.bootstrap import bootstrap
    from app.db import Database
    from app.main import create_app
    from app.relay.policy import retry_policy

    system = bootstrap(settings, Database(settings.database_url or UNCONNECTED_URL))
    here = system.hosted
    modules = [
        {
            "name": m.name,
            "hosted": m.name in here,
            "commands": len(m.commands),
            "queries": len(m.queries),
            "subscriptions": sum(len(subs) for subs in m.subscriptions.values()),
            "background": len(m.background),
        }
        for m in system.modules
    ]
    messages = []
    for m in system.modules:
        for kind, handlers in (("command", m.commands), ("query", m.queries)):
            for message_type, handler in handlers.items():
                messages.append({
                    "message": f"{m.name}.{message_type.__name__}",
                    "kind": kind,
                    "module": m.name,
                    "hosted": m.name in here,
                    "handler": _name(handler),
                    # the deadline the mediator applies: the message's own timeout or the default
                    "deadline_seconds": system.mediator.route(message_type).timeout,
                })  # fmt: skip
    fed = system.from_broker  # with a broker: hosted subscribers' events from other groups
    subscriptions = []
    for name, bound in system.subscriptions.items():
        sub = bound.subscription
        policy = retry_policy(sub, settings)
        compensation = getattr(sub, "on_dead_letter", None)
        subscriptions.append({
            "name": name,
            "module": sub.module,
            "hosted": sub.module in here,
            "events": [event_type.topic() for event_type in bound.event_types],
            "retired": not bound.event_types,  # Module.retired: no new rows, delivers the old ones
            "handler": _name(sub.handler),
            "max_attempts": policy.max_attempts,
            "retry_base_seconds": policy.base_seconds,
            "retry_cap_seconds": policy.cap_seconds,
            "compensation": None if compensation is None else _name(compensation),
            # with a broker: the events it reads from JetStream here, or (not hosted) all of them
            "from_jetstream": fed.get(name, []) if sub.module in here else
                              [t.topic() for t in bound.event_types] if settings.nats_url else [],
        })  # fmt: skip
    background = [
        {"module": m.name, "hosted": m.name in here, "task": _name(task)} for m in system.modules for task in m.background
    ]
    projections = [
        {"module": m.name, "hosted": m.name in here, "event": event_type.topic(), "handler": _name(handler)}
        for m in system.modules
        for event_type, handlers in m.projections.items()
        for handler in (handlers if isinstance(handlers, (list, tuple)) else (handlers,))
    ]
    return {
        "modules": modules,
        "messages": messages,
        "subscriptions": subscriptions,
        "background": background,
        "projections": projections,
        "routes": _routes(create_app(settings, run_relay=False)),
    }


def _routes(app) -> list[dict[str, str]]:
    routes = []
    for route in app.routes:
        for handler in route.route_handlers:
            methods = sorted(handler.http_methods)
            if methods == ["OPTIONS"] and handler.fn.__module__.startswith("litestar."):
                continue  # litestar answers OPTIONS on every path by itself
            routes.extend({"method": method, "path": route.path, "handler": _name(handler.fn)} for method in methods)
    return sorted(routes, key=lambda r: (r["path"], r["method"]))


def _name(obj: Any) -> str:
    """`package.module.function` (or `...Class.method`) of a handler, as in a traceback."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module is None or qualname is None:  # not a function: say what it is (a name stays a name)
        return obj if isinstance(obj, str) else repr(obj)
    return f"{module}.{qualname.replace('.<locals>', '')}"


def render(wiring: dict[str, Any]) -> str:
    here = lambda row: "here" if row["hosted"] else "remote"  # noqa: E731

    def runs(s: dict) -> str:  # a subscription: where, and whether (some of) its events cross JetStream
        return here(s) + (" (via JetStream)" if s.get("from_jetstream") else "")
    sections = [
        ("modules", ["module", "runs", "commands", "queries", "subscriptions", "background"],
         [[m["name"], here(m), m["commands"], m["queries"], m["subscriptions"], m["background"]]
          for m in wiring["modules"]]),
        ("commands and queries", ["message", "kind", "runs", "deadline", "handler"],
         [[r["message"], r["kind"], here(r), f"{r['deadline_seconds']:g}s", r["handler"]] for r in wiring["messages"]]),
        ("subscriptions", ["subscriber", "events", "runs", "attempts", "base", "cap", "compensation", "handler"],
         [[s["name"], ", ".join(s["events"]) or "(retired: old rows only)", runs(s), s["max_attempts"], f"{s['retry_base_seconds']:g}s",
           f"{s['retry_cap_seconds']:g}s", s["compensation"] or "-", s["handler"]] for s in wiring["subscriptions"]]),
        ("inline projections", ["event", "module", "runs", "handler"],
         [[p["event"], p["module"], here(p), p["handler"]] for p in wiring["projections"]]),
        ("background tasks", ["module", "runs", "task"],
         [[t["module"], here(t), t["task"]] for t in wiring["background"]]),
        ("http routes", ["method", "path", "handler"],
         [[r["method"], r["path"], r["handler"]] for r in wiring["routes"]]),
    ]  # fmt: skip
    return "\n".join(f"{title}\n{_table(columns, rows)}" for title, columns, rows in sections)


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [columns] + [[str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines + (["  (none)"] if not rows else [])) + "\n"
