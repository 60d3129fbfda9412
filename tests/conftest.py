"""Real PostgreSQL for every test: the embedded server (or DATABASE_URL's), migrated once with
alembic; tables are emptied between tests. Never a mock of the database."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
from litestar.testing import AsyncTestClient

from app.bootstrap import System, bootstrap
from app.db import Database, EmbeddedPostgres, ensure_database, normalize_url, with_database
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


@pytest.fixture
def settings(base_settings: Settings) -> Settings:
    return base_settings


@pytest.fixture(scope="session")
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await Database(database_url, max_size=30).connect()
    yield database
    await database.close()


TABLES = (
    "events, outbox, dead_letter_history, dead_letters, inbox, services, checkpoints,"
    " inventory_reservations, orders_view, notifications_sent"
)


@pytest.fixture(autouse=True)
async def clean(request) -> None:
    if "db" in request.fixturenames or "client" in request.fixturenames or "system" in request.fixturenames:
        database = request.getfixturevalue("db")
        await database.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")
    fake_provider.attempts.clear()


@pytest.fixture
def system(settings: Settings, db: Database) -> System:
    return bootstrap(settings, db)


@pytest.fixture
def relay(system: System) -> Relay:
    return Relay(system, instance_id="relay-test")


@pytest.fixture
async def client(settings: Settings, db: Database) -> AsyncIterator[AsyncTestClient]:
    """The whole HTTP app (relay off: tests drain it themselves) on the test database."""
    app = create_app(replace(settings, admin_token="secret-admin-token"), run_relay=False)
    async with AsyncTestClient(app=app) as client:
        yield client
