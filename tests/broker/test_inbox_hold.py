"""The taken-rows (`broker:<subscriber>` inbox rows) of a subscriber fed from JetStream are what make a redelivery a no-op, and
JetStream redelivers a message it holds unacknowledged (applied and committed, then its consumer
died before the ack) once a consumer pulls again. So the purge keeps those rows, whatever their
age, until this process's consumers have been pulling, connected, long enough to have had every
such message back; a subscriber fed only from its own outbox is purged as before."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from app.bootstrap import bootstrap
from app.broker.apply import taken_name
from app.broker.runtime import BrokerLink
from app.relay import Relay

CHARGE = "payments.charge_order"  # OrderPlaced comes from group A's orders: through the broker
TAKEN = taken_name(CHARGE)  # the consumer's taken-rows: what a redelivery from JetStream meets
NOTIFY = "notifications.notify_customer"  # payments' events: B's own outbox


def group_b(settings, database_url_b, db_b, nats_url: str):
    settings_b = replace(settings, database_url=database_url_b, modules=("payments", "notifications"),
                         nats_url=nats_url, inbox_retention_seconds=60.0, instance_id="b")  # fmt: skip
    return bootstrap(settings_b, db_b)


async def old_inbox_rows(db, *subscribers: str) -> None:
    for subscriber in subscribers:
        await db.execute(
            "INSERT INTO inbox (subscriber, message_id, processed_at) VALUES ($1, $2, now() - interval '1 day')",
            subscriber, uuid.uuid4(),
        )  # fmt: skip


async def left(db) -> set[str]:
    return {r["subscriber"] for r in await db.fetch("SELECT subscriber FROM inbox")}


async def test_without_a_live_link_the_broker_fed_rows_are_held(settings, database_url_b, clean_b):
    system = group_b(settings, database_url_b, clean_b, "nats://127.0.0.1:1")
    assert set(system.inbox_holds()) == {TAKEN}
    await old_inbox_rows(clean_b, TAKEN, CHARGE, NOTIFY)

    assert await Relay(system).purge_inbox() == 2  # the plain names are the relay's own: purged
    assert await left(clean_b) == {TAKEN}


async def test_a_link_releases_them_once_its_consumers_pulled_long_enough_and_holds_them_while_down(
    settings, database_url_b, clean_b, nats_cluster
):
    system = group_b(settings, database_url_b, clean_b, ",".join(nats_cluster.urls))
    link = BrokerLink(system)
    await link.start()
    try:
        await old_inbox_rows(clean_b, TAKEN, NOTIFY)
        assert system.inbox_holds() == {TAKEN}  # just connected: a redelivery may still come
        assert await Relay(system).purge_inbox() == 1 and await left(clean_b) == {TAKEN}

        window = 2 * max(c.ack_wait for c in link.consumers)
        link.live_since = time.monotonic() - window  # connected and pulling for the whole window
        assert system.inbox_holds() == frozenset()
        await link._disconnected()  # the broker is away: its consumers pull nothing
        assert system.inbox_holds() == {TAKEN}
        assert await Relay(system).purge_inbox() == 0

        await link._reconnected()
        link.live_since -= window
        assert await Relay(system).purge_inbox() == 1 and await left(clean_b) == set()
    finally:
        await link.stop()
