"""Dead letters operated by SQL: switchboard_dlq_replay / switchboard_dlq_discard do what the CLI
and the admin API do (they call them through app/relay/dead_letters.py): one implementation,
three doors."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import asyncpg
import pytest
from alembic import command

from app.db import OUTBOX_CHANNEL, ensure_database, with_database
from app.messages import PermanentError
from app.migrate import alembic_config, upgrade
from app.relay import Relay
from app.relay import dead_letters as operations
from app.wiring import Envelope, Subscription
from tests.app.relay_worker import (
    SUBSCRIBER,
    TestEvent,
    append,
    applied,
    build_system,
    deliver_everything,
    recorder,
)
from tests.conftest import schema_tables

pytestmark = pytest.mark.usefixtures("effects")

SCRATCH = "switchboard_dlq_functions_test"


def poison(event: TestEvent, envelope: Envelope) -> None:
    if event.key == "ticker-00000" and event.seq == 1:
        raise PermanentError("no")


@pytest.fixture
def relay(settings, db) -> Relay:
    system = build_system(replace(settings, retry_max_attempts=3), db, [Subscription(SUBSCRIBER, recorder(poison))])
    return Relay(system, instance_id="relay-test")


async def parked(relay: Relay) -> int:
    """Key 0 (three events) parked behind its first event's dead letter; key 1 delivered."""
    await append(relay.system, 2, 3)
    await deliver_everything(relay)
    [letter] = await operations.parked_ids(relay.db)
    return letter


async def state(db) -> dict:
    """What replay or discard may change: letters, history, the outbox (actors made comparable)."""
    letters = await db.fetch("SELECT id, status, resolved_by IS NOT NULL AS resolved FROM dead_letters ORDER BY id")
    history = await db.fetch("SELECT dead_letter_id, action FROM dead_letter_history ORDER BY id")
    outbox = await db.fetch(
        "SELECT id, status, attempts, blocked_by, locked_by, first_failed_at IS NULL AS fresh,"
        " available_at <= now() AS due FROM outbox WHERE status <> 'delivered' ORDER BY id"
    )
    return {
        "letters": [tuple(r) for r in letters],
        "history": [tuple(r) for r in history],
        "outbox": [tuple(r) for r in outbox],
    }


async def python_api(db, verb: str, letter: int, actor: str) -> list[int]:
    return await getattr(operations, verb)(db, [letter], actor)


async def sql_array(db, verb: str, letter: int, actor: str) -> list[int]:
    rows = await db.fetch(f"SELECT switchboard_dlq_{verb}(array[{letter}], $1) AS id", actor)
    return [r["id"] for r in rows]


async def sql_single(db, verb: str, letter: int, actor: str) -> list[int]:
    rows = await db.fetch(f"SELECT switchboard_dlq_{verb}({letter}::bigint, $1) AS id", actor)
    return [r["id"] for r in rows]


async def empty(db) -> None:
    await db.execute(f"TRUNCATE {await schema_tables(db)} RESTART IDENTITY")


@pytest.mark.parametrize("verb", ["replay", "discard"])
@pytest.mark.parametrize("door", [sql_array, sql_single], ids=["array", "single"])
async def test_sql_does_what_the_python_api_does(relay, db, verb, door):
    letter = await parked(relay)
    assert await python_api(db, verb, letter, "cli:me") == [letter]
    through_python = await state(db)
    await empty(db)
    assert await parked(relay) == letter  # the same scenario again, ids and all

    assert await door(db, verb, letter, "psql:me") == [letter]

    assert await state(db) == through_python
    assert await db.fetchval("SELECT resolved_by FROM dead_letters WHERE id = $1", letter) == "psql:me"
    assert await db.fetchval(
        "SELECT actor FROM dead_letter_history WHERE dead_letter_id = $1 ORDER BY id DESC LIMIT 1", letter
    ) == "psql:me"


async def test_a_discard_by_sql_lets_the_rows_parked_behind_the_letter_be_delivered(relay, db):
    letter = await parked(relay)

    await db.execute("SELECT switchboard_dlq_discard(array[$1::bigint], 'psql:me')", letter)
    await deliver_everything(relay)

    assert (await applied(db))["ticker-00000"] == [2, 3]
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'") == 0


@pytest.mark.parametrize("verb", ["replay", "discard"])
async def test_an_unknown_id_changes_nothing_and_returns_nothing(relay, db, verb):
    await parked(relay)
    before = await state(db)

    rows = await db.fetch(f"SELECT switchboard_dlq_{verb}(array[424242], 'psql:me')")

    assert rows == []
    assert await state(db) == before


@pytest.mark.parametrize("verb", ["replay", "discard"])
async def test_a_letter_no_longer_parked_is_left_alone_and_not_returned(relay, db, verb):
    letter = await parked(relay)
    await db.execute("SELECT switchboard_dlq_discard($1::bigint, 'first')", letter)
    before = await state(db)

    rows = await db.fetch(f"SELECT switchboard_dlq_{verb}($1::bigint, 'second')", letter)

    assert rows == []
    assert await state(db) == before


async def test_the_actor_defaults_to_the_database_user(relay, db):
    letter = await parked(relay)
    user = await db.fetchval("SELECT current_user")

    assert [r[0] for r in await db.fetch(f"SELECT switchboard_dlq_replay({letter})")] == [letter]

    assert await db.fetchval("SELECT resolved_by FROM dead_letters WHERE id = $1", letter) == f"sql:{user}"


async def test_a_replay_by_sql_wakes_the_relays(relay, db, database_url):
    letter = await parked(relay)
    woken = asyncio.Event()
    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener(OUTBOX_CHANNEL, lambda *_: woken.set())

        await db.execute("SELECT switchboard_dlq_replay($1::bigint, 'psql:me')", letter)

        await asyncio.wait_for(woken.wait(), 5)
    finally:
        await listener.close()


async def test_the_python_api_goes_through_the_sql_functions(relay, db):
    letter = await parked(relay)
    await db.execute("ALTER FUNCTION switchboard_dlq_replay(bigint[], text) RENAME TO switchboard_dlq_replay_away")
    try:
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await operations.replay(db, [letter], "cli:me")
    finally:
        await db.execute("ALTER FUNCTION switchboard_dlq_replay_away(bigint[], text) RENAME TO switchboard_dlq_replay")
    assert await operations.replay(db, [letter], "cli:me") == [letter]


# -- the migration --------------------------------------------------------------------------------

FUNCTIONS_SQL = """
SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')' FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'public' AND p.proname LIKE 'switchboard_dlq_%' ORDER BY 1
"""


async def _recreate(admin: str) -> None:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{SCRATCH}" WITH (FORCE)')
    finally:
        await conn.close()
    await ensure_database(admin, SCRATCH)


async def _catalog(url: str) -> tuple[list[str], bool]:
    conn = await asyncpg.connect(url)
    try:
        column = await conn.fetchval(
            "SELECT count(*) = 1 FROM information_schema.columns"
            " WHERE table_name = 'dead_letters' AND column_name = 'compensation'"
        )
        return [r[0] for r in await conn.fetch(FUNCTIONS_SQL)], column
    finally:
        await conn.close()


def test_the_migration_creates_the_functions_and_its_downgrade_drops_them(database_url):
    asyncio.run(_recreate(with_database(database_url, "postgres")))
    url = with_database(database_url, SCRATCH)
    upgrade(url, "0006")
    assert asyncio.run(_catalog(url)) == (
        [
            "switchboard_dlq_discard(id bigint, actor text)",
            "switchboard_dlq_discard(ids bigint[], actor text)",
            "switchboard_dlq_replay(id bigint, actor text)",
            "switchboard_dlq_replay(ids bigint[], actor text)",
        ],
        True,
    )

    command.downgrade(alembic_config(url), "0005")

    assert asyncio.run(_catalog(url)) == ([], False)
    upgrade(url)
