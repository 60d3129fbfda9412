"""POST /orders with one Idempotency-Key against two different replicas: one order."""

from __future__ import annotations

import asyncio

from tests.scale.conftest import Cluster, call, order_body

ORDER = order_body("lamp", 2, "pm_card_ok", customer="c-42")


async def test_the_same_key_on_two_replicas_creates_one_order_and_answers_the_same(cluster: Cluster, db):
    one, two = await cluster.start_many(["replica-1", "replica-2"])
    http = cluster.http
    await call(http, "POST", f"{one.url}/inventory/items", json_body={"sku": "lamp", "quantity": 10})
    key = {"Idempotency-Key": "checkout-7f3a"}

    first = await call(http, "POST", f"{one.url}/orders", json_body=ORDER, headers=key)
    second = await call(http, "POST", f"{two.url}/orders", json_body=ORDER, headers=key)

    assert first[0] == 201, first
    assert second[0] == 201, second
    assert second[2] == first[2]  # the same body: order id, position, placed_at
    assert second[1]["Location"] == first[1]["Location"]
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'orders.OrderPlaced'") == 1
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'inventory.StockReserved'") == 1
    _, _, level = await call(http, "GET", f"{two.url}/inventory/items/lamp")
    assert level["available"] == 8, level  # reserved once (then committed when the payment lands)

    # the key with another request, on either replica: 422, nothing new
    other = {**ORDER, "payment_method": "pm_card_declined"}
    for server in (one, two):
        status, _, problem = await call(http, "POST", f"{server.url}/orders", json_body=other, headers=key)
        assert status == 422, problem
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'orders.OrderPlaced'") == 1


async def test_the_same_key_sent_to_two_replicas_at_once_creates_one_order(cluster: Cluster, db):
    one, two = await cluster.start_many(["replica-1", "replica-2"])
    http = cluster.http
    await call(http, "POST", f"{one.url}/inventory/items", json_body={"sku": "lamp", "quantity": 10})

    for attempt in range(5):  # a few races: each key once on both replicas at the same moment
        key = {"Idempotency-Key": f"race-{attempt}"}
        answers = await asyncio.gather(
            call(http, "POST", f"{one.url}/orders", json_body=ORDER, headers=key),
            call(http, "POST", f"{two.url}/orders", json_body=ORDER, headers=key),
        )
        created = [body for status, _, body in answers if status == 201]
        assert created, answers
        # the loser of a race is told to retry (409, request in progress) or gets the same answer
        assert all(body == created[0] for body in created), answers
        assert all(status == 201 or (status == 409 and "in progress" in body["title"]) for status, _, body in answers), answers
        retry = await call(http, "POST", f"{two.url}/orders", json_body=ORDER, headers=key)
        assert retry[0] == 201 and retry[2] == created[0], retry
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'orders.OrderPlaced'") == 5
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'inventory.StockReserved'") == 5
