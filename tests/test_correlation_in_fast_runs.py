"""Events recorded by the relay's fast run keep the correlation id of the delivery that caused them.

A fast run appends every event its handlers recorded in one statement; each delivery stamps its
events with its own ids when its handler commits (app/relay/fast.py), so two orders delivered in
one run do not share the last one's correlation id."""

from __future__ import annotations


async def test_each_order_keeps_its_own_correlation_id_through_one_relay_run(client, app_relay):
    await client.post("/inventory/items", json={"sku": "widget", "quantity": 5})
    body = {"customer_id": "c-1", "items": [{"sku": "widget", "quantity": 1}], "payment_method": "pm_card_ok"}
    first = (await client.post("/orders", json=body, headers={"X-Request-ID": "first"})).json()["order_id"]
    second = (await client.post("/orders", json=body, headers={"X-Request-ID": "second"})).json()["order_id"]

    await app_relay.drain()

    rows = await client.app.state.system.db.fetch(
        "SELECT stream_id, metadata->>'correlation_id' AS correlation FROM events WHERE stream_id LIKE 'payment-%'"
    )
    assert {r["stream_id"]: r["correlation"] for r in rows} == {f"payment-{first}": "first", f"payment-{second}": "second"}
