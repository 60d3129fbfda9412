"""Alembic environment: async SQLAlchemy engine over asyncpg; one advisory lock so replicas
starting together migrate one at a time."""

import asyncio
import os

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.ext.asyncio import create_async_engine

from app.db import sqlalchemy_url

MIGRATION_LOCK = 7_411_101  # arbitrary constant shared by every switchboard process


def _url() -> str:
    url = context.config.attributes.get("url") or os.environ.get("DATABASE_URL")
    if not url:
        raise RuntimeError("no database URL: run through `switchboard migrate`")
    return sqlalchemy_url(url)


def _run(connection) -> None:
    connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})  # session-level
    connection.commit()
    try:
        context.configure(connection=connection, target_metadata=None, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    finally:
        connection.rollback()
        connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
        connection.commit()


async def _main() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline SQL generation is not supported; run `switchboard migrate`")
asyncio.run(_main())
