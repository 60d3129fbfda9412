"""Configuration from the environment: one frozen dataclass, read once.

Each setting is declared once, as a field made by `setting()`: its environment variable, default
and one-line doc. `from_env` and the README's configuration table are built from those fields;
`python -m app.settings --markdown` prints the table (tests/test_settings.py keeps README equal).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints


class SettingsError(ValueError):
    """An environment variable holds a value its setting cannot take (one line, for the CLI)."""


def setting(
    default: Any = dataclasses.MISSING,
    *,
    env: str | None,
    doc: str,
    unit: str = "",
    factory: Callable[[], Any] | None = None,
    shown: str | None = None,
) -> Any:
    """A Settings field. env None: set only in code (tests, bench), not from the environment.
    unit goes into the error message; shown is the README's default when a factory makes it."""
    metadata = {"env": env, "doc": doc, "unit": unit, "shown": shown}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Settings:
    database_url: str | None = setting(
        None,
        env="DATABASE_URL",
        doc="`postgresql://…` (or `postgresql+asyncpg://…`); unset: the embedded server in the data dir",
    )
    data_dir: Path = setting(
        Path(".switchboard"),
        env="SWITCHBOARD_DATA_DIR",
        doc="embedded server's folder; processes sharing it share the server",
    )
    instance_id: str = setting(
        env=None,
        factory=_instance_id,
        shown="HOST-PID-RANDOM",
        doc="this process's name in the registry, relay claims and dead-letter history",
    )
    modules: tuple[str, ...] | None = setting(
        None, env="SWITCHBOARD_MODULES", doc="comma-separated modules this process hosts; unset: all"
    )
    admin_token: str | None = setting(
        None, env="SWITCHBOARD_ADMIN_TOKEN", doc="bearer token for `/admin`; unset: the admin API is off"
    )
    internal_token: str | None = setting(
        None,
        env="SWITCHBOARD_INTERNAL_TOKEN",
        doc="shared secret of `/internal/messages` between instances; unset: no module can be called from another process",
    )
    base_url: str | None = setting(
        None,
        env="SWITCHBOARD_BASE_URL",
        doc="where other instances reach this one (registered in `services`); `serve` sets `http://HOST:PORT`",
    )
    heartbeat_seconds: float = setting(
        2.0, env="SWITCHBOARD_HEARTBEAT", unit="seconds", doc="registry heartbeat (s); 3 missed beats = gone"
    )
    db_pool_size: int = setting(20, env="SWITCHBOARD_DB_POOL_SIZE", doc="connections in the asyncpg pool")
    max_body_bytes: int = setting(1_048_576, env=None, doc="largest request body accepted (bytes)")
    # mediator
    default_timeout: float = setting(
        5.0,
        env="SWITCHBOARD_TIMEOUT",
        unit="seconds",
        doc="mediator deadline (s) unless a message sets its own",
    )
    breaker_fail_max: int = setting(
        5, env="SWITCHBOARD_BREAKER_FAIL_MAX", doc="failures in a row that open a module's circuit breaker"
    )
    breaker_reset_seconds: float = setting(
        30.0,
        env="SWITCHBOARD_BREAKER_RESET",
        unit="seconds",
        doc="an open breaker lets a call through after this (s)",
    )
    bulkhead_limit: int = setting(
        200, env="SWITCHBOARD_BULKHEAD", doc="concurrent calls per module before 503"
    )
    conflict_retries: int = setting(
        30, env=None, doc="times the mediator runs a command again after a `ConcurrencyError`"
    )
    # relay
    relay_batch_size: int = setting(
        200, env="SWITCHBOARD_RELAY_BATCH", doc="outbox rows the relay claims at once"
    )
    relay_poll_seconds: float = setting(
        0.5,
        env="SWITCHBOARD_RELAY_POLL",
        unit="seconds",
        doc="relay's fallback poll when no wake-up comes (s)",
    )
    relay_lease_seconds: float = setting(
        30.0,
        env="SWITCHBOARD_RELAY_LEASE",
        unit="seconds",
        doc="a relay's claim on rows, extended while it works; a crashed relay's rows are claimable again after this (s)",
    )
    relay_handler_timeout: float = setting(
        10.0, env=None, unit="seconds", doc="a subscriber's delivery fails after this (s)"
    )
    # While commands or queries are running, the relay delivers one group at a time, for rows
    # younger than this (seconds): the synchronous path keeps the CPU, the async side catches up
    # when it is quiet. Older rows go at full speed whatever the load. 0: never yield.
    relay_yield_seconds: float = setting(
        30.0,
        env="SWITCHBOARD_RELAY_YIELD",
        unit="seconds",
        doc="while requests are in flight, the relay delivers one group at a time for rows younger than this (s); `0`: never",
    )
    # After a wake-up, the relay waits this long (seconds) before it claims, so the rows that
    # commit meanwhile go in the same claim and the same delivery transactions: at moderate rates
    # it would otherwise claim each commit's rows alone. It adds at most this much lag. 0: none.
    relay_linger_seconds: float = setting(
        0.01,
        env="SWITCHBOARD_RELAY_LINGER",
        unit="seconds",
        doc="after a wake-up the relay waits this long (s) before it claims, so the next commits' rows go in the same claim; `0`: claim at once (lower lag, more transactions)",
    )
    # 0 deletes a row in the acknowledgement itself: no 'delivered' version of the row, no index
    # entries for it, no purge later. Keeping rows is for inspecting what was delivered.
    outbox_retention_seconds: float = setting(
        0.0,
        env="SWITCHBOARD_OUTBOX_RETENTION",
        unit="seconds",
        doc="`0`: an outbox row is deleted when it is delivered; N > 0: delivered rows stay in `outbox` N seconds for inspection (`switchboard outbox`, the dashboard's correlation search), at the cost of more WAL, index entries and a purge per row",
    )
    inbox_retention_seconds: float = setting(
        3600.0,
        env="SWITCHBOARD_INBOX_RETENTION",
        unit="seconds",
        doc="an `inbox` row (this subscriber applied that message) is purged once older than this (s) and its message has no undelivered outbox row left; a relay frozen longer than this after its lease lapsed could apply a message twice",
    )
    retry_base_seconds: float = setting(
        0.5,
        env="SWITCHBOARD_RETRY_BASE",
        unit="seconds",
        doc="a failed delivery's first backoff (s), doubled per attempt up to the cap, with full jitter",
    )
    retry_cap_seconds: float = setting(
        60.0, env="SWITCHBOARD_RETRY_CAP", unit="seconds", doc="longest retry backoff (s)"
    )
    retry_max_attempts: int = setting(
        8, env="SWITCHBOARD_RETRY_MAX_ATTEMPTS", doc="attempts before a row becomes a dead letter"
    )
    reservation_ttl_seconds: float = setting(
        900.0,
        env="SWITCHBOARD_RESERVATION_TTL",
        unit="seconds",
        doc="inventory: a stock hold with no payment outcome is released after this (s); longer than a charge's whole retry budget",
    )
    idempotency_retention_seconds: float = setting(
        86400.0,
        env="SWITCHBOARD_IDEMPOTENCY_RETENTION",
        unit="seconds",
        doc="orders: an `Idempotency-Key` of `POST /orders` is honoured this long (s) after its first use, then forgotten (a retry after that places a new order)",
    )
    # broker (issue 15): events to modules behind another database travel through NATS JetStream
    nats_url: str | None = setting(
        None,
        env="SWITCHBOARD_NATS_URL",
        doc="`nats://HOST:PORT` (comma-separated for a cluster) of the JetStream servers between databases; unset: no broker, everything goes through this database's outbox",
    )
    broker_port: int = setting(
        4222, env="SWITCHBOARD_BROKER_PORT", doc="port `switchboard broker` listens on (`broker --port`)"
    )
    log_level: str = setting(
        "info",
        env="SWITCHBOARD_LOG_LEVEL",
        doc="`debug`, `info`, `warning`, `error` or `critical`; at `debug`, a line per request, mediator call and delivery (`serve --log-level`)",
    )
    log_format: str = setting(
        "auto",
        env="SWITCHBOARD_LOG_FORMAT",
        doc="`json` (one object per line), `console`, or `auto`: console on a terminal, else json. (Tracing: the standard `OTEL_*` variables)",
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Every declared variable that is set; a value that does not parse is a SettingsError."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            if name == "DATABASE_URL" and name in environ:
                values[f.name] = _database_url(environ[name])
            elif name is not None and name in environ:
                values[f.name] = _parse(name, environ[name], _types()[f.name], f.metadata["unit"])
        return cls(**values)


def _optional_str(raw: str) -> str | None:
    return raw or None  # empty = unset


POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg", "postgres+asyncpg")


def _database_url(raw: str) -> str | None:
    """A PostgreSQL URL or nothing: another scheme would otherwise be tried as PostgreSQL on the
    default port, and a typo would surface as a connection error far from its cause."""
    from urllib.parse import urlsplit

    if not raw:
        return None  # empty = unset
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as error:
        raise SettingsError(f"DATABASE_URL is not a valid URL ({error}): use postgresql://USER:PASSWORD@HOST:PORT/DATABASE") from None
    if parts.scheme.lower() not in POSTGRES_SCHEMES:
        shown = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise SettingsError(
            f"DATABASE_URL has {shown}: switchboard needs PostgreSQL, postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    if not parts.netloc and "host=" not in parts.query:
        raise SettingsError("DATABASE_URL names no host: use postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
    return raw


def _names(raw: str) -> tuple[str, ...] | None:
    return tuple(m.strip() for m in raw.split(",") if m.strip()) if raw else None  # empty = unset


# type -> (parser, what the error says the value should be)
_PARSERS: dict[Any, tuple[Callable[[str], Any], str]] = {
    float: (float, "a number"),
    int: (int, "a whole number"),
    Path: (Path, "a path"),
    str: (str, "a string"),
    str | None: (_optional_str, "a string"),
    tuple[str, ...] | None: (_names, "a comma-separated list"),
}


@cache
def _types() -> dict[str, Any]:
    return get_type_hints(Settings)


def _parse(name: str, raw: str, type_: Any, unit: str) -> Any:
    parse, expected = _PARSERS[type_]
    try:
        return parse(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not {expected}" + (f" ({unit})" if unit else "")) from None


def _shown(f: dataclasses.Field) -> str:
    value = f.default if f.metadata["shown"] is None else f.metadata["shown"]
    if value is None:
        return "unset"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def markdown_table() -> str:
    """The README's configuration table: one row per setting, in declaration order."""
    lines = ["| variable | setting | default | |", "|---|---|---|---|"]
    for f in dataclasses.fields(Settings):
        env = f"`{f.metadata['env']}`" if f.metadata["env"] else "— (code only)"
        lines.append(f"| {env} | `{f.name}` | {_shown(f)} | {f.metadata['doc']} |")
    return "\n".join(lines)


@cache
def get_settings() -> Settings:
    return Settings.from_env()


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m app.settings --markdown")
    print(markdown_table())
