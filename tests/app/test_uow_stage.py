"""UnitOfWork.stage: module-table rows written in the statement that appends the events."""

from __future__ import annotations

import pytest

from app.messages import ConcurrencyError
from tests.app.relay_worker import Ticker, build_system

TABLE_DDL = """
CREATE TABLE IF NOT EXISTS uow_stage_test (
    key   text PRIMARY KEY,
    n     integer NOT NULL
)
"""
COLUMNS = {"key": "text", "n": "int"}


def add_new_ticker(uow) -> None:
    """One event for ticker 00001, decided as if its stream were empty (version 1)."""
    ticker = Ticker("00001")
    ticker.tick()
    uow.add(ticker)


@pytest.fixture
async def system(db, settings):
    await db.execute(TABLE_DDL)
    await db.execute("TRUNCATE uow_stage_test")
    return build_system(settings, db)


async def rows(db) -> list[tuple]:
    return [tuple(r) for r in await db.fetch("SELECT key, n FROM uow_stage_test ORDER BY key")]


# one row goes in as plain parameters, several as one array per column: both ways must write them
@pytest.mark.parametrize("staged", [[("a", 1)], [("a", 1), ("b", 2)]], ids=["one row", "two rows"])
async def test_staged_rows_commit_with_the_events_in_one_statement(system, db, staged):
    uow = system.uow()
    async with uow:
        add_new_ticker(uow)
        uow.stage("uow_stage_test", COLUMNS, staged)
        await uow.commit()

    assert await rows(db) == staged
    # the same statement: the rows were written by the transaction that appended the event
    [event_tx] = await db.fetch("SELECT xmin::text AS tx FROM events")
    assert {r["tx"] for r in await db.fetch("SELECT xmin::text AS tx FROM uow_stage_test")} == {event_tx["tx"]}


async def test_staged_rows_are_not_written_when_the_append_loses_a_concurrency_race(system, db):
    first = system.uow()
    async with first:
        add_new_ticker(first)
        await first.commit()

    stale = system.uow()
    with pytest.raises(ConcurrencyError):
        async with stale:
            add_new_ticker(stale)  # decided on an empty stream: version 1 is taken
            stale.stage("uow_stage_test", COLUMNS, [("a", 1)])
            await stale.commit()

    assert await rows(db) == []


@pytest.mark.parametrize(
    ("staged", "expected"),
    [([("a", 1)], [("a", 0)]), ([("a", 1), ("c", 3)], [("a", 0), ("c", 3)])],
    ids=["one row", "two rows"],
)
async def test_staged_rows_without_events_are_written_on_commit_and_conflicts_skipped(
    system, db, staged, expected
):
    await db.execute("INSERT INTO uow_stage_test VALUES ('a', 0)")
    uow = system.uow()
    async with uow:
        uow.stage("uow_stage_test", COLUMNS, staged)
        await uow.commit()

    assert await rows(db) == expected


async def test_staged_rows_of_a_unit_that_never_commits_are_dropped(system, db):
    with pytest.raises(RuntimeError):
        async with system.uow() as uow:
            uow.stage("uow_stage_test", COLUMNS, [("a", 1)])
            raise RuntimeError("decided otherwise")

    assert await rows(db) == []


@pytest.mark.parametrize(
    ("table", "columns"),
    [
        ("uow_stage_test; drop table events", COLUMNS),
        ("uow_stage_test", {'key" text': "text"}),
        ("uow_stage_test", {"key": "text[]); drop table events; --"}),
    ],
)
async def test_only_plain_identifiers_and_type_names_are_accepted(system, table, columns):
    uow = system.uow()
    with pytest.raises(ValueError):
        uow.stage(table, columns, [("a",)])
