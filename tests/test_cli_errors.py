"""The `switchboard` command says what happened: each failure is one line on stderr with what to
do and a non-zero exit, never a traceback (unless --debug), and before anything starts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import pytest

from app.db import normalize_url, with_database
from app.migrate import head_revision
from tests.test_cli import ROOT, switchboard


def previous_revision() -> str:
    from app.migrate import revisions

    return revisions()[-2]


UNREACHABLE = "postgresql://switchboard:secret@127.0.0.1:1/switchboard"


def env_for(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_") and k != "DATABASE_URL"}
    return env | variables


async def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("switchboard: "), err
    return err


# -- DATABASE_URL ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://root:secret@db.example:3306/shop", "scheme 'mysql'"),
        ("not-a-url", "no scheme"),
        ("postgresql://db.example:port/shop", "not a valid URL"),
        ("postgresql:///shop", "no host"),
    ],
    ids=["mysql", "not a url", "bad port", "no host"],
)
async def test_a_database_url_that_is_no_postgresql_url_is_one_line_and_exit_2(url, says):
    code, out, err = await run(env_for(DATABASE_URL=url), "migrate")

    assert code == 2
    assert "DATABASE_URL" in one_line(err) and says in err
    assert "secret" not in err
    assert out == ""


@pytest.mark.parametrize(
    "args", [("migrate",), ("outbox", "status"), ("dlq", "list"), ("serve", "--port", "0", "--no-migrate")],
    ids=["migrate", "outbox", "dlq", "serve"],
)  # fmt: skip
async def test_an_unreachable_database_is_one_line_naming_host_and_port(args):
    code, out, err = await run(env_for(DATABASE_URL=UNREACHABLE), *args)

    assert code == 1
    assert "127.0.0.1:1" in one_line(err)
    assert "secret" not in err
    assert "serving on" not in out


async def test_debug_shows_the_traceback():
    code, _, err = await run(env_for(DATABASE_URL=UNREACHABLE), "--debug", "migrate")

    assert code != 0
    assert "Traceback" in err


# -- serve -------------------------------------------------------------------------------------


async def test_serve_with_an_unknown_module_names_the_known_ones_before_starting(database_url):
    code, out, err = await run(env_for(DATABASE_URL=database_url), "serve", "--port", "0", "--modules", "invntory")

    assert code == 2
    assert "'invntory'" in one_line(err) and "inventory, orders, payments, notifications" in err
    assert out == ""


async def test_an_unknown_module_in_the_environment_is_refused_the_same_way(database_url):
    env = env_for(DATABASE_URL=database_url, SWITCHBOARD_MODULES="orders,paymnets")

    code, out, err = await run(env, "serve", "--port", "0")

    assert code == 2
    assert "'paymnets'" in one_line(err) and "SWITCHBOARD_MODULES" in err
    assert out == ""


# -- migrate -----------------------------------------------------------------------------------


@pytest.fixture
async def fresh_database(database_url):
    """A database of its own on the test server: these tests move its schema up and down."""
    admin = await asyncpg.connect(normalize_url(with_database(database_url, "postgres")))
    await admin.execute("DROP DATABASE IF EXISTS switchboard_cli_migrate WITH (FORCE)")
    await admin.execute("CREATE DATABASE switchboard_cli_migrate")
    try:
        yield with_database(database_url, "switchboard_cli_migrate")
    finally:
        await admin.execute("DROP DATABASE IF EXISTS switchboard_cli_migrate WITH (FORCE)")
        await admin.close()


async def test_migrate_reports_what_it_changed(fresh_database):
    head, previous = head_revision(), previous_revision()
    env = env_for(DATABASE_URL=fresh_database)

    assert (await run(env, "migrate"))[:2] == (0, f"upgraded base \u2192 {head}\n")
    assert (await run(env, "migrate"))[:2] == (0, f"already at head {head}\n")
    assert (await run(env, "migrate", "--to", previous))[:2] == (0, f"downgraded {head} \u2192 {previous}\n")
    assert (await run(env, "migrate", "--to", previous))[:2] == (0, f"already at {previous}\n")
    assert (await run(env, "migrate"))[:2] == (0, f"upgraded {previous} \u2192 {head}\n")


async def test_migrate_status_prints_current_head_and_pending(fresh_database):
    head, previous = head_revision(), previous_revision()
    env = env_for(DATABASE_URL=fresh_database)
    assert (await run(env, "migrate", "--to", previous))[0] == 0

    code, out, err = await run(env, "migrate", "status")

    assert code == 0, err
    assert out == f"current: {previous}\nhead:    {head}\npending: {head}\n"


async def test_migrate_to_an_unknown_revision_is_one_line_and_exit_2(fresh_database):
    code, out, err = await run(env_for(DATABASE_URL=fresh_database), "migrate", "--to", "nonsense")

    assert code == 2
    assert "unknown revision 'nonsense'" in one_line(err)
    assert out == ""


@pytest.mark.parametrize("word", ["nonsense", "0004"])
async def test_migrate_with_an_unknown_action_is_one_line_and_exit_2(database_url, word):
    code, out, err = await run(env_for(DATABASE_URL=database_url), "migrate", word)

    assert code == 2
    assert repr(word) in one_line(err) and "--help" in err
    assert out == ""


# -- dlq, pipes, version, help -----------------------------------------------------------------


@pytest.mark.parametrize("action", ["replay", "discard"])
async def test_resolving_an_unknown_dead_letter_says_so_and_exits_1(database_url, action):
    code, out, err = await switchboard(database_url, "dlq", action, "99")

    assert code == 1
    assert err == "switchboard: no dead letter 99\n"
    assert out == ""


def test_a_reader_that_closed_its_pipe_ends_the_command_quietly(database_url):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte, as `| head` is after its first line
    try:
        result = subprocess.run(
            [sys.executable, "-m", "app", "outbox", "status", "--json"], cwd=ROOT,
            env=env_for(DATABASE_URL=database_url), stdout=write, stderr=subprocess.PIPE, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write)

    assert result.stderr.decode() == ""
    assert result.returncode in (0, 141)


async def test_version_prints_the_package_version():
    from importlib.metadata import version

    code, out, _ = await run(env_for(), "--version")

    assert (code, out) == (0, f"switchboard {version('switchboard')}\n")


async def test_help_shows_defaults_and_the_environment_variables():
    code, out, _ = await run(env_for(), "--help")

    assert code == 0
    assert "environment variables:" in out
    for name in ("DATABASE_URL", "SWITCHBOARD_DATA_DIR", "SWITCHBOARD_INTERNAL_TOKEN", "SWITCHBOARD_RELAY_YIELD"):
        assert name in out
    code, out, _ = await run(env_for(), "serve", "--help")
    assert "(default: 8000)" in out and "(default: 127.0.0.1)" in out
