"""`serve --workers 2` outlives one of its workers: the dead one is replaced, the other keeps
serving, and the main process keeps its embedded PostgreSQL running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import aiohttp

from tests.scale.conftest import Cluster, EmbeddedServer, alive, postmaster_pid, start_embedded, wait_for

WINDOW = 15.0  # seconds after the kill that are measured
SETTLE = 5.0  # after this, every request must succeed
CLIENTS = 4


async def steady_load(server: EmbeddedServer, session: aiohttp.ClientSession, results: list, stop: asyncio.Event):
    """GET /health/ready in a loop; records (start time, succeeded)."""
    while not stop.is_set():
        started = time.monotonic()
        ok = False
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with session.get(f"{server.url}/health/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                ok = r.status == 200
        results.append((started, ok))
        await asyncio.sleep(0.01)


async def test_a_killed_worker_is_replaced_while_the_other_keeps_serving(cluster: Cluster, tmp_path):
    server = await start_embedded(cluster, "serve", tmp_path / "data", workers=2)

    async def two_workers():
        pids = server.workers_pids()
        return pids if len(pids) == 2 else None

    workers = await wait_for(two_workers, 30, "2 workers")
    postmaster = postmaster_pid(server.data_dir)
    assert postmaster is not None and alive(postmaster)

    results: list[tuple[float, bool]] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:
        load = [asyncio.create_task(steady_load(server, session, results, stop)) for _ in range(CLIENTS)]
        try:

            async def flowing():
                return sum(ok for _, ok in results) >= 20

            await wait_for(flowing, 30, "the load to flow")
            victim = min(workers)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()

            async def replaced():
                assert server.process is not None and server.process.poll() is None, (
                    f"serve exited ({server.process.returncode}) after a worker died:\n{server.log()}"
                )
                now = server.workers_pids()
                return len(now) == 2 and victim not in now and now - workers

            new = await wait_for(replaced, 30, "a new worker pid")
            await asyncio.sleep(max(0.0, killed_at + WINDOW - time.monotonic()))  # the measured window
        finally:
            stop.set()
            await asyncio.gather(*load)

    window = [ok for started, ok in results if killed_at <= started <= killed_at + WINDOW]
    settled = [ok for started, ok in results if killed_at + SETTLE <= started <= killed_at + WINDOW]
    assert window and sum(window) / len(window) >= 0.9, f"{sum(window)}/{len(window)} succeeded in {WINDOW:g}s"
    assert settled and all(settled), f"{settled.count(False)} of {len(settled)} failed after {SETTLE:g}s"
    assert server.process.poll() is None, "the main process exited"
    assert alive(postmaster), "the embedded PostgreSQL stopped"
    assert new
