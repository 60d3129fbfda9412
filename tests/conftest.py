"""Real PostgreSQL for every test: the embedded server (or DATABASE_URL's), migrated once with
alembic; tables are emptied between tests. Never a mock of the database."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import httpx
import pytest
from litestar import Litestar

from app.bootstrap import System, bootstrap
from app.db import Database, ensure_database, normalize_url, with_database
from app.embedded import EmbeddedPostgres
from app.main import create_app
from app.migrate import upgrade
from app.relay import Relay
from app.settings import Settings
from modules.payments.gateway import fake_provider

TEST_DATABASE = "switchboard_test"


@pytest.fixture(scope="session")
def database_url(tmp_path_factory) -> Iterator[str]:
    external = os.environ.get("DATABASE_URL")
    embedded = None
    if external:
        admin = normalize_url(external)
    else:
        embedded = EmbeddedPostgres(tmp_path_factory.mktemp("switchboard"))
        admin = embedded.admin_url
    asyncio.run(ensure_database(admin, TEST_DATABASE))
    url = with_database(normalize_url(admin), TEST_DATABASE)
    upgrade(url)
    yield url
    if embedded is not None:
        embedded.stop()


@pytest.fixture(scope="session")
def base_settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        instance_id="test",
        db_pool_size=20,
        relay_poll_seconds=0.05,
        retry_base_seconds=0.001,
        retry_cap_seconds=0.01,
        breaker_reset_seconds=0.2,
    )


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "outbox_retention(seconds): delivered outbox rows kept that long (default 0: deleted on delivery)"
    )


@pytest.fixture
def settings(base_settings: Settings, request) -> Settings:
    """`@pytest.mark.outbox_retention(3600)` on a test that reads delivered outbox rows keeps them."""
    marker = request.node.get_closest_marker("outbox_retention")
    return base_settings if marker is None else replace(base_settings, outbox_retention_seconds=marker.args[0])


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await Database(database_url, max_size=30).connect()
    yield database
    await database.close()


async def schema_tables(db: Database) -> str:
    """Every table the migrations made (all of `public` but alembic's own), as a TRUNCATE list: a
    new module's table is emptied between tests without being listed here."""
    names = await db.fetch(
        "SELECT quote_ident(tablename) AS name FROM pg_tables"
        " WHERE schemaname = 'public' AND tablename <> 'alembic_version' ORDER BY tablename"
    )
    return ", ".join(row["name"] for row in names)


_tables: list[str] = []  # schema_tables, read from the catalog once per session


@pytest.fixture(autouse=True)
async def clean(request) -> None:
    if "db" in request.fixturenames or "client" in request.fixturenames or "system" in request.fixturenames:
        database = request.getfixturevalue("db")
        if not _tables:
            _tables.append(await schema_tables(database))
        await database.execute(f"TRUNCATE {_tables[0]} RESTART IDENTITY")
    fake_provider.calls.clear()


@pytest.fixture
def system(settings: Settings, db: Database) -> System:
    return bootstrap(settings, db)


@pytest.fixture
def relay(system: System) -> Relay:
    return Relay(system, instance_id="relay-test")


class AppClient(httpx.AsyncClient):
    app: Litestar


@pytest.fixture
async def client(settings: Settings, db: Database) -> AsyncIterator[AppClient]:
    """The whole app (relay off: tests drive delivery) served in the test's own event loop.

    Not litestar's AsyncTestClient: it runs the app in a portal thread and blocks the calling loop
    per request, so asyncio.gather() over it would run requests one at a time, and a Relay over
    `client.app.state.system` would use a pool bound to another loop."""
    app = create_app(replace(settings, admin_token="secret-admin-token"), run_relay=False)
    started, stop = asyncio.Event(), asyncio.Event()

    async def serve() -> None:  # the lifespan's task group must be entered and left in one task
        async with app.lifespan():
            started.set()
            await stop.wait()

    server = asyncio.create_task(serve())
    ready = asyncio.create_task(started.wait())
    await asyncio.wait([server, ready], return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        server.result()  # the lifespan failed before it was ready: raise its error
    try:
        async with AppClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as http:
            http.app = app
            yield http
    finally:
        stop.set()
        await server


@pytest.fixture
def app_relay(client: AppClient) -> Relay:
    """A relay over the app's own system (the app runs none: tests drive delivery)."""
    return Relay(client.app.state.system, instance_id="t")
