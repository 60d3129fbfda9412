"""POST /orders with an Idempotency-Key: once per key, the same answer to every retry."""

from __future__ import annotations

ORDER = {"customer_id": "c-1", "items": [{"sku": "widget", "quantity": 2}], "payment_method": "pm_card_ok"}


async def stock(client, quantity: int = 10) -> None:
    response = await client.post("/inventory/items", json={"sku": "widget", "quantity": quantity})
    assert response.status_code == 201, response.text


async def test_a_retried_order_with_the_same_key_returns_the_first_body_and_creates_nothing(client, db):
    await stock(client)

    first = await client.post("/orders", json=ORDER, headers={"Idempotency-Key": "k-1"})
    again = await client.post("/orders", json=ORDER, headers={"Idempotency-Key": "k-1"})

    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'orders.OrderPlaced'") == 1
    level = (await client.get("/inventory/items/widget")).json()
    assert level == {"sku": "widget", "available": 8, "reserved": 2}


async def test_the_same_key_with_a_different_body_is_a_422(client):
    await stock(client)
    await client.post("/orders", json=ORDER, headers={"Idempotency-Key": "k-2"})

    response = await client.post("/orders", json={**ORDER, "payment_method": "pm_card_declined"},
                                 headers={"Idempotency-Key": "k-2"})

    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_a_rejected_order_is_rejected_again_for_its_key_even_after_stock_arrives(client, db):
    await stock(client, quantity=1)
    first = await client.post("/orders", json=ORDER, headers={"Idempotency-Key": "k-3"})
    await stock(client, quantity=10)

    again = await client.post("/orders", json=ORDER, headers={"Idempotency-Key": "k-3"})

    assert first.status_code == again.status_code == 409
    assert again.json()["detail"] == first.json()["detail"]
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'orders.OrderPlaced'") == 0


async def test_orders_without_a_key_are_independent(client, db):
    await stock(client)

    await client.post("/orders", json=ORDER)
    await client.post("/orders", json=ORDER)

    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'orders.OrderPlaced'") == 2
