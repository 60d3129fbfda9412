"""app/relay/dead_letters.py, as the relay, the CLI and the admin API call it: parking a held
row, then reading the letter (list, get, parked ids)."""

from __future__ import annotations

import pytest

from app.messages import PermanentError
from app.relay import dead_letters
from app.relay.claims import Claims
from tests.app.relay_worker import SUBSCRIBER, append, build_system

pytestmark = pytest.mark.usefixtures("effects")


async def claim_first_row(settings, db, instance_id: str):
    system = build_system(settings, db)
    await append(system, 1, 2)
    batch = await Claims(db, instance_id, [SUBSCRIBER], 1, 30.0).claim()
    batch.keeper.cancel()
    return batch.rows[0]


async def test_parking_a_held_row_records_a_letter_with_its_history_and_parks_its_keys_later_rows(
    settings, db
):
    row = await claim_first_row(settings, db, "relay-a")

    letter = await dead_letters.park(db, row, PermanentError("no"), "PermanentError: no", "relay-a")

    assert await dead_letters.parked_ids(db) == [letter]
    assert [d["id"] for d in await dead_letters.list_dead_letters(db, subscriber=SUBSCRIBER)] == [letter]
    detail = await dead_letters.get_dead_letter(db, letter)
    assert (detail["status"], detail["error_type"], detail["outbox_id"]) == (
        "parked",
        "PermanentError",
        row["id"],
    )
    assert [(h["action"], h["actor"]) for h in detail["history"]] == [("parked", "relay:relay-a")]
    statuses = await db.fetch("SELECT status, blocked_by FROM outbox ORDER BY id")
    assert [tuple(s) for s in statuses] == [("dead", None), ("blocked", letter)]


async def test_a_row_whose_lease_another_relay_holds_is_not_parked(settings, db):
    row = await claim_first_row(settings, db, "relay-a")

    assert await dead_letters.park(db, row, PermanentError("no"), "PermanentError: no", "relay-b") is None

    assert await dead_letters.parked_ids(db) == []
    assert await dead_letters.list_dead_letters(db, status=None) == []
