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


def run_script(op, script: str) -> None:
    """Run a DDL script one statement at a time (asyncpg prepares each statement; it refuses
    several in one). Scripts here keep semicolons out of comments and literals."""
    for statement in script.split(";"):
        if statement.strip():
            op.execute(statement)
