"""The database: one asyncpg pool per process, the relays' wake-up, and URL handling
(app/embedded.py starts the embedded PostgreSQL when no DATABASE_URL is set).

The hot paths (append + outbox, relay claims) are hand-written SQL on asyncpg with prepared
statements; SQLAlchemy drives alembic's migrations. See docs/ARCHITECTURE.md for why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from app.deadlines import DEADLINE_MARGIN, remaining_seconds

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "switchboard"
OUTBOX_CHANNEL = "switchboard_outbox"


def normalize_url(url: str) -> str:
    """Accept `postgresql+asyncpg://` (SQLAlchemy style) as well as plain `postgresql://`."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme == "postgres":
        scheme = "postgresql"
    return urlunsplit(parts._replace(scheme=scheme))


def sqlalchemy_url(url: str) -> str:
    parts = urlsplit(normalize_url(url))
    return urlunsplit(parts._replace(scheme="postgresql+asyncpg"))


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


class DatabaseUnreachable(Exception):
    """The database at DATABASE_URL cannot be used: one line naming where and why, for the CLI."""


def where(url: str) -> str:
    """HOST:PORT/DATABASE of a URL, never its password."""
    parts = urlsplit(url)
    try:
        port = parts.port or 5432
    except ValueError:
        port = 5432
    return f"{parts.hostname or 'localhost'}:{port}{parts.path or ''}"


async def probe(url: str, timeout: float = 5.0) -> None:
    """Connect once, so a command fails with DatabaseUnreachable before it starts anything."""
    try:
        connection = await asyncpg.connect(normalize_url(url), timeout=timeout)
    except (OSError, TimeoutError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise DatabaseUnreachable(f"cannot reach the database at {where(url)} ({reason}): is PostgreSQL running there? check DATABASE_URL") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise DatabaseUnreachable(f"the database at {where(url)} refused the connection: {error}") from None
    await connection.close()


async def ensure_database(admin_url: str, database: str) -> None:
    conn = await asyncpg.connect(normalize_url(admin_url))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{database}"')  # name is ours, never input
            except asyncpg.DuplicateDatabaseError:
                pass
    finally:
        await conn.close()


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Pool reset: asyncpg rolls back any open transaction itself; nothing here sets session state
    (no SET, LISTEN, advisory locks or cursors on pooled connections), so skip its RESET ALL round
    trip on every release."""


class PoolExhausted(ConnectionError):
    """No pooled connection came free before the waiting call's deadline."""


# What an unreachable or lost database raises: a socket error (refused, reset, timed out), a lost
# connection, the server refusing sessions (starting up, shutting down, too many clients), a pool
# that is closing or has no connection free in time. The mediator reports these as
# DatabaseUnavailable: they say nothing about the module whose handler met them.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


class _Pool(asyncpg.Pool):
    """asyncpg's pool, except that inside a mediator call a wait for a free connection ends just
    before the call's deadline with PoolExhausted, so a full pool is reported as the database's
    unavailability rather than as the timeout of whichever module happened to be waiting.
    Outside mediator calls (relay, registry) the wait is unbounded, as asyncpg's is."""

    def acquire(self, *, timeout: float | None = None):
        if timeout is None and self.get_idle_size() == 0 and self.get_size() >= self.get_max_size():
            left = remaining_seconds()
            if left is not None:
                return _BoundedAcquire(super().acquire(timeout=max(left - DEADLINE_MARGIN, 0.001)))
        return super().acquire(timeout=timeout)


class _BoundedAcquire:
    """An acquire with a timeout (awaited or used with `async with`) whose timeout is PoolExhausted."""

    __slots__ = ("_inner",)

    def __init__(self, inner) -> None:
        self._inner = inner

    def __await__(self):
        return self._get().__await__()

    async def _get(self) -> asyncpg.Connection:
        try:
            return await self._inner
        except TimeoutError:
            raise PoolExhausted("no database connection came free before the deadline") from None

    async def __aenter__(self) -> asyncpg.Connection:
        try:
            return await self._inner.__aenter__()
        except TimeoutError:
            raise PoolExhausted("no database connection came free before the deadline") from None

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.__aexit__(*exc)


class Database:
    """An asyncpg pool, and the wake-up of relays after outbox rows commit: callbacks in this
    process at once, and one coalesced `NOTIFY` on `OUTBOX_CHANNEL` for relays in others."""

    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 20, notify_interval: float = 0.002) -> None:
        self.url = normalize_url(url)
        self.min_size = min_size
        self.max_size = max_size
        self.notify_interval = notify_interval
        self.pool: asyncpg.Pool | None = None
        self._listeners: list[Callable[[], object]] = []
        self._dirty = False
        self._notifier: asyncio.Task | None = None

    def on_outbox_written(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call `callback` after every commit that wrote outbox rows; returns the unsubscriber."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def outbox_written(self) -> None:
        for callback in list(self._listeners):
            callback()
        self._dirty = True
        if self._notifier is None or self._notifier.done():
            self._notifier = asyncio.get_running_loop().create_task(self._notify())

    async def notified(self) -> None:
        """Wait until the pending coalesced NOTIFY (if any) has been sent."""
        if self._notifier is not None:
            await asyncio.shield(self._notifier)

    async def _notify(self) -> None:
        # One NOTIFY (its own tiny transaction) per interval covers every commit before it; a
        # commit landing while it is sent sets _dirty again and gets the next one.
        while self._dirty:
            await asyncio.sleep(self.notify_interval)
            self._dirty = False
            try:
                await self.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("could not NOTIFY relays (they poll anyway): %s", error)

    async def connect(self) -> Database:
        # what asyncpg.create_pool does, with its defaults, for the pool class above
        self.pool = await _Pool(
            self.url,
            min_size=self.min_size,
            max_size=self.max_size,
            max_queries=50000,
            max_inactive_connection_lifetime=300.0,
            loop=None,
            connection_class=asyncpg.Connection,
            record_class=asyncpg.Record,
            command_timeout=30,
            reset=_keep_session,
            server_settings={"application_name": "switchboard"},
        )
        return self

    async def close(self) -> None:
        if self._notifier is not None:
            self._notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._notifier
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    def acquire(self):
        assert self.pool is not None, "Database.connect() was not awaited"
        return self.pool.acquire()

    async def execute(self, sql: str, *args) -> str:
        async with self.acquire() as conn:
            return await conn.execute(sql, *args)

    async def fetch(self, sql: str, *args) -> list[asyncpg.Record]:
        async with self.acquire() as conn:
            return await conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args) -> asyncpg.Record | None:
        async with self.acquire() as conn:
            return await conn.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args):
        async with self.acquire() as conn:
            return await conn.fetchval(sql, *args)
