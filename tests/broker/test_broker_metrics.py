"""/metrics across databases: the link's connection, what it applied from JetStream, and what
JetStream still holds for this group's subscribers (a backlog no outbox table shows)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from types import SimpleNamespace

import msgspec
import nats

from app.bootstrap import bootstrap
from app.broker.runtime import BrokerLink
from app.broker.stream import STREAM, subject
from app.metrics_export import Exporter, register
from modules.inventory.commands import AddStock
from modules.orders.commands import OrderLine, PlaceOrder
from modules.payments.events import PaymentCaptured
from tests.metrics.scrape import sample_names, value
from tests.scale.conftest import wait_for
from tests.test_deploy_rules import BROKER, referenced

SUBSCRIBER = "orders.mark_order_paid"  # group A's: fed with payments' events from B


async def place_order(system) -> uuid.UUID:
    await system.mediator.send(AddStock(sku="widget", quantity=5))
    lines = (OrderLine(sku="widget", quantity=1),)
    accepted = await system.mediator.send(PlaceOrder(customer_id="c-1", lines=lines, payment_method="pm_card_ok"))
    return accepted.order_id


async def publish_captured(nc, order_id: uuid.UUID) -> None:
    event = PaymentCaptured(order_id=order_id, payment_method="pm_card_ok", provider_reference="ref")
    key = f"payment-{order_id}"
    headers = {"Nats-Msg-Id": str(uuid.uuid4()), "Switchboard-Type": event.topic(),
               "Switchboard-Partition-Key": key, "Switchboard-Position": "1"}  # fmt: skip
    await nc.jetstream().publish(subject(key, event.topic()), msgspec.json.encode(event), stream=STREAM, headers=headers)


async def test_the_scrape_shows_the_connection_what_was_applied_and_what_jetstream_still_holds(settings, db, nats_cluster):
    register()
    settings_a = replace(settings, modules=("orders", "inventory"), nats_url=",".join(nats_cluster.urls))
    runtime = SimpleNamespace(system=bootstrap(settings_a, db), broker=None)
    runtime.broker = link = BrokerLink(runtime.system)
    exporter = Exporter(runtime)
    await link.start()
    nc = await nats.connect(nats_cluster.urls)
    try:
        found = (await exporter.scrape()).decode()
        assert value(found, "switchboard_broker_connected", modules="inventory,orders") == 1
        assert value(found, "switchboard_broker_pending", subscriber=SUBSCRIBER) == 0
        before = value(found, "switchboard_broker_consumed_total", subscriber=SUBSCRIBER) or 0

        await publish_captured(nc, await place_order(runtime.system))

        async def applied() -> bool:
            exporter.broker.read_at = None  # the backlog is read at most every few seconds
            found = (await exporter.scrape()).decode()
            return value(found, "switchboard_broker_consumed_total", subscriber=SUBSCRIBER) == before + 1

        await wait_for(applied, 20, "the message applied and counted")

        for consumer in link.consumers:
            await consumer.stop()
        await publish_captured(nc, await place_order(runtime.system))
        exporter.broker.read_at = None
        found = (await exporter.scrape()).decode()
        assert value(found, "switchboard_broker_pending", subscriber=SUBSCRIBER) == 1
        # every broker series an alert or the Grafana dashboard names is in this scrape
        wanted = {n for names in referenced().values() for n in names if n.startswith(BROKER)}
        assert wanted and wanted <= sample_names(found), sorted(wanted - sample_names(found))
    finally:
        await nc.close()
        await link.stop()
    assert value((await exporter.scrape()).decode(), "switchboard_broker_connected", modules="inventory,orders") == 0
