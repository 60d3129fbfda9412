"""The families operators page on, in one process (the `client` fixture): outbox depth by status,
the most overdue row, parked dead letters, breakers, bulkheads, the pool, HTTP durations."""

from __future__ import annotations

import uuid

from tests.metrics.scrape import samples, value
from tests.test_order_flow import CHARGE, dead_letters, drain_until, stocked_order


async def scrape(client, *, fresh: bool = True) -> dict:
    if fresh:  # the database gauges are cached for a few seconds: start this scrape with none
        client.app.state.metrics.database.read_at = None
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return samples(response.text)


async def test_a_broken_payment_moves_from_pending_rows_to_a_parked_dead_letter(client, app_relay, db):
    await stocked_order(client, "pm_card_broken")
    before = await scrape(client)
    pending = {
        dict(labels)["subscriber"]: v
        for (name, labels), v in before.items()
        if name == "switchboard_outbox_rows" and dict(labels)["status"] == "pending"
    }
    undelivered = await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'pending'")
    assert undelivered > 0 and sum(pending.values()) == undelivered, (pending, undelivered)
    assert value(before, "switchboard_dead_letters_parked", subscriber=CHARGE) == 0
    assert value(before, "switchboard_outbox_rows", subscriber=CHARGE, status="dead") == 0

    async def parked() -> bool:
        return len(await dead_letters(db)) == 1

    await drain_until(app_relay, parked)
    after = await scrape(client)

    assert value(after, "switchboard_dead_letters_parked", subscriber=CHARGE) == 1
    assert value(after, "switchboard_outbox_rows", subscriber=CHARGE, status="dead") == 1
    for status in ("pending", "inflight", "blocked"):
        assert value(after, "switchboard_outbox_rows", subscriber=CHARGE, status=status) == 0, status
    assert value(after, "switchboard_outbox_oldest_due_seconds", subscriber=CHARGE) == 0
    assert value(after, "switchboard_breaker_open", module="inventory") == 0
    assert value(after, "switchboard_bulkhead_in_flight", module="orders") == 0
    assert value(after, "switchboard_db_pool_connections", state="max") == 20
    pool = client.app.state.system.db.pool
    opened = value(after, "switchboard_db_pool_connections", state="in_use") + value(
        after, "switchboard_db_pool_connections", state="idle"
    )
    assert opened == pool.get_size() >= 1


async def test_a_due_row_nobody_delivers_shows_its_overdue_age(client, db):
    await stocked_order(client, "pm_card_ok")
    await db.execute("UPDATE outbox SET available_at = now() - interval '90 seconds' WHERE status = 'pending'")
    found = await scrape(client)
    overdue = [v for (name, _), v in found.items() if name == "switchboard_outbox_oldest_due_seconds"]
    assert 90 <= max(overdue) < 120, overdue


async def test_a_blocked_row_is_counted_as_blocked(client, db):
    await stocked_order(client, "pm_card_ok")
    await db.execute("UPDATE outbox SET status = 'blocked' WHERE id = (SELECT min(id) FROM outbox)")
    subscriber = await db.fetchval("SELECT subscriber FROM outbox WHERE status = 'blocked'")
    assert value(await scrape(client), "switchboard_outbox_rows", subscriber=subscriber, status="blocked") == 1


async def test_the_database_gauges_are_read_at_most_every_few_seconds(client, db):
    database = client.app.state.metrics.database
    await scrape(client)
    readings = database.readings
    await stocked_order(client, "pm_card_ok")  # new rows: a fresh reading would count them

    cached = await scrape(client, fresh=False)
    assert database.readings == readings, "a scrape within max_age read the database again"
    assert not any(v for (name, _), v in cached.items() if name == "switchboard_outbox_rows")
    fresh = await scrape(client)
    assert database.readings == readings + 1
    assert any(v for (name, _), v in fresh.items() if name == "switchboard_outbox_rows")


async def test_an_open_breaker_reads_1_until_it_closes(client):
    breaker = client.app.state.system.mediator.breakers["inventory"]
    breaker.open()
    try:
        assert value(await scrape(client), "switchboard_breaker_open", module="inventory") == 1
    finally:
        breaker.close()
    assert value(await scrape(client), "switchboard_breaker_open", module="inventory") == 0


async def test_http_durations_are_labelled_by_route_template_never_the_raw_path(client):
    order_id = uuid.uuid4()
    assert (await client.get(f"/orders/{order_id}")).status_code == 404
    assert (await client.get("/no/such/route/42")).status_code == 404
    assert (await client.request("BREW", "/orders")).status_code in (404, 405)

    response = await client.get("/metrics")
    found = samples(response.text)

    count = "switchboard_http_request_duration_seconds_count"
    assert value(found, count, method="GET", route="/orders/{order_id}", status="404") >= 1
    assert value(found, count, method="GET", route="unmatched", status="404") >= 1
    assert any(dict(labels).get("method") == "other" for name, labels in found if name == count)
    assert str(order_id) not in response.text and "/no/such" not in response.text
