"""Every migration goes down as well as up: head -> base -> head on a scratch database, and the
schema that comes back is the same."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import command

from app.db import ensure_database, with_database
from app.migrate import alembic_config, upgrade

SCRATCH = "switchboard_migrations_test"

SCHEMA_SQL = """
SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns
WHERE table_schema = 'public' AND table_name <> 'alembic_version' ORDER BY 1, 2
"""
INDEXES_SQL = """
SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename <> 'alembic_version' ORDER BY 1
"""


async def _recreate(admin: str) -> None:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{SCRATCH}" WITH (FORCE)')
    finally:
        await conn.close()
    await ensure_database(admin, SCRATCH)


async def _schema(url: str) -> tuple[list, list]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(SCHEMA_SQL)], [tuple(r) for r in await conn.fetch(INDEXES_SQL)]
    finally:
        await conn.close()


def test_migrations_go_down_to_base_and_up_again_to_the_same_schema(database_url):
    admin = with_database(database_url, "postgres")
    asyncio.run(_recreate(admin))
    url = with_database(database_url, SCRATCH)
    upgrade(url)
    first = asyncio.run(_schema(url))

    command.downgrade(alembic_config(url), "base")
    assert asyncio.run(_schema(url)) == ([], [])
    upgrade(url)

    assert asyncio.run(_schema(url)) == first
    assert first[0]  # the head schema has tables
