"""Run alembic from code: `switchboard migrate`, `serve` on start, and the tests."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Blocking; call through asyncio.to_thread from async code (env.py runs its own loop)."""
    command.upgrade(alembic_config(url), revision)


@cache
def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


@cache
def revisions() -> tuple[str, ...]:
    """Every revision this code knows, oldest first."""
    script = ScriptDirectory.from_config(alembic_config(""))
    return tuple(reversed([r.revision for r in script.walk_revisions()]))


class UnknownRevision(ValueError):
    """A revision this code does not know (one line, for the CLI)."""


async def current_revision(url: str) -> str | None:
    """The database's revision; None for a database never migrated."""
    import asyncpg

    from app.db import normalize_url

    connection = await asyncpg.connect(normalize_url(url))
    try:
        return await connection.fetchval("SELECT version_num FROM alembic_version")
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await connection.close()


def migrate_to(url: str, target: str = "head") -> tuple[str | None, str | None]:
    """Upgrade or downgrade to `target` ("head", "base" or a revision); returns (before, after),
    read from the database, so the caller reports what happened rather than what was asked."""
    import asyncio

    known = revisions()
    wanted = {"head": known[-1], "base": None}.get(target, target)
    if wanted is not None and wanted not in known:
        raise UnknownRevision(f"unknown revision {target!r}: this code knows {', '.join(known)} (and head, base)")
    before = asyncio.run(current_revision(url))
    if before is not None and before not in known:
        raise UnknownRevision(f"the database is at revision {before!r}, which this code does not know: is it older than the database?")
    position = {None: -1, **{r: i for i, r in enumerate(known)}}
    if position[wanted] > position[before]:
        command.upgrade(alembic_config(url), wanted)
    elif position[wanted] < position[before]:
        command.downgrade(alembic_config(url), wanted or "base")
    return before, asyncio.run(current_revision(url))


def run_script(op, script: str) -> None:
    """Run a DDL script one statement at a time (asyncpg prepares each statement; it refuses
    several in one). Scripts here keep semicolons out of comments and literals."""
    for statement in script.split(";"):
        if statement.strip():
            op.execute(statement)
