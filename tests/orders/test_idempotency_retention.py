"""Idempotency-Key retention: a key is honoured for the retention period after its first use,
then forgotten by orders' background task, so orders_idempotency does not grow forever."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from modules.orders import idempotency
from modules.orders.module import module
from tests.app.relay_worker import wait_until
from tests.orders.test_idempotency import ORDER, stock

DAY = 86400.0


async def place(client, key: str):
    response = await client.post("/orders", json=ORDER, headers={"Idempotency-Key": key})
    assert response.status_code == 201, response.text
    return response.json()


async def orders_placed(db) -> int:
    return await db.fetchval("SELECT count(*) FROM events WHERE type = 'orders.OrderPlaced'")


async def test_keys_past_the_retention_are_forgotten_and_fresh_ones_stay_and_still_dedupe(client, db):
    await stock(client)
    old, fresh = await place(client, "k-old"), await place(client, "k-fresh")
    await db.execute("UPDATE orders_idempotency SET claimed_at = claimed_at - interval '25 hours' WHERE key = 'k-old'")

    assert await idempotency.forget_expired(db, DAY) == 1

    assert [r["key"] for r in await db.fetch("SELECT key FROM orders_idempotency")] == ["k-fresh"]
    assert await place(client, "k-fresh") == fresh  # still the first answer, nothing new placed
    assert await orders_placed(db) == 2
    again = await place(client, "k-old")  # forgotten: the retry is a new request
    assert again["order_id"] != old["order_id"]
    assert await orders_placed(db) == 3


async def test_keys_are_forgotten_in_batches(client, db, monkeypatch):
    monkeypatch.setattr(idempotency, "FORGET_BATCH", 2)
    await db.execute(
        "INSERT INTO orders_idempotency (key, fingerprint, order_id, claimed_at)"
        " SELECT 'k-' || g, 'f', gen_random_uuid(), now() - interval '2 days' FROM generate_series(1, 5) g"
    )

    assert await idempotency.forget_expired(db, DAY, rounds=2) == 4  # two batches of 2, then it stops
    assert await idempotency.forget_expired(db, DAY) == 1


async def test_orders_background_task_forgets_expired_keys_on_its_own(client, db, settings):
    await stock(client)
    await place(client, "k-1")
    task = asyncio.create_task(
        idempotency.forget_expired_keys(db, replace(settings, idempotency_retention_seconds=0.2))
    )
    try:

        async def forgotten() -> bool:
            return await db.fetchval("SELECT count(*) FROM orders_idempotency") == 0

        await wait_until(forgotten, 10.0, "the expired key to be forgotten")
    finally:
        task.cancel()


def test_the_orders_module_runs_the_sweep_in_every_process_that_hosts_it():
    assert idempotency.forget_expired_keys in module.background
