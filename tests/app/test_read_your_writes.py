"""Read-your-writes (app/consistency.py): a subscriber has applied an event once no undelivered
outbox row of it is left for that subscriber -- a delivery's effects commit with its
acknowledgement, so no inbox row is needed to tell."""

from __future__ import annotations

import pytest

from app.consistency import is_applied, wait_until_applied
from app.wiring import Subscription
from tests.app.relay_worker import SUBSCRIBER, append, recorder, relay_for

pytestmark = pytest.mark.usefixtures("effects")


async def test_an_event_is_applied_once_its_delivery_committed_and_not_before(db, settings):
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder()))
    await append(relay.system, 1, 1)
    position = await db.fetchval("SELECT position FROM events")

    assert not await is_applied(db, SUBSCRIBER, position)
    assert not await wait_until_applied(db, SUBSCRIBER, position, timeout=0.05)
    await relay.drain()

    assert await is_applied(db, SUBSCRIBER, position)
    assert await db.fetchval("SELECT count(*) FROM inbox") == 0
    assert await db.fetchval("SELECT count(*) FROM relay_test_effects") == 1


async def test_an_event_for_another_subscriber_or_no_event_leaves_nothing_to_wait_for(db, settings):
    relay = relay_for(settings, db, Subscription(SUBSCRIBER, recorder()))
    await append(relay.system, 1, 1)
    position = await db.fetchval("SELECT position FROM events")

    assert await is_applied(db, "testing.other", position)
    assert await is_applied(db, SUBSCRIBER, position + 1000)
