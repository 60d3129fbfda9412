"""Split deployment: process A hosts orders, payments and notifications; process B hosts
inventory; one database. A reaches inventory over HTTP through the registry (issue 4)."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time

from tests.scale.conftest import (
    ADMIN_TOKEN,
    BREAKER_FAIL_MAX,
    BREAKER_RESET,
    HEARTBEAT,
    INTERNAL_TOKEN,
    TIMEOUT,
    Cluster,
    Server,
    call,
    order_body,
    wait_for,
)

A_MODULES = "orders,payments,notifications"
STALE = 3 * HEARTBEAT  # "stale instances disappear within 3 heartbeat intervals"
SLACK = 0.5  # scheduling on a busy 2-core machine


async def order_status(cluster: Cluster, server: Server, order_id: str) -> str | None:
    status, _, body = await call(cluster.http, "GET", f"{server.url}/orders/{order_id}")
    return body["status"] if status == 200 else None


async def wait_order(cluster: Cluster, server: Server, order_id: str, expected: str, timeout: float = 15) -> None:
    async def reached():
        return await order_status(cluster, server, order_id) == expected

    await wait_for(reached, timeout, f"order {order_id} to be {expected}")


async def stock(cluster: Cluster, server: Server, sku: str) -> dict:
    status, _, body = await call(cluster.http, "GET", f"{server.url}/inventory/items/{sku}")
    assert status == 200, body
    return body


async def wait_stock(cluster: Cluster, server: Server, sku: str, available: int, reserved: int) -> None:
    async def reached():
        level = await stock(cluster, server, sku)
        return level["available"] == available and level["reserved"] == reserved and level

    await wait_for(reached, 15, f"{sku} to be {available} available / {reserved} reserved on {server.name}")


async def delivered(cluster: Cluster, server: Server) -> dict[str, float]:
    """switchboard_relay_delivered_total by subscriber, from the server's /metrics."""
    status, _, text = await call(cluster.http, "GET", f"{server.url}/metrics")
    assert status == 200
    counts = {}
    for line in text.splitlines():
        if line.startswith("switchboard_relay_delivered_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('subscriber="', 1)[1].split('"', 1)[0]] = float(value)
    return counts


async def services_cli(cluster: Cluster) -> list[dict]:
    result = await asyncio.to_thread(cluster.switchboard, "services", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def admin_services(cluster: Cluster, server: Server) -> list[dict]:
    status, _, body = await call(
        cluster.http, "GET", f"{server.url}/admin/services", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert status == 200, body
    return body


async def place(cluster: Cluster, server: Server, body: dict) -> tuple[int, dict, object, float]:
    started = time.monotonic()
    status, headers, answer = await call(cluster.http, "POST", f"{server.url}/orders", json_body=body)
    return status, headers, answer, time.monotonic() - started


async def split(cluster: Cluster, **env: str) -> tuple[Server, Server]:
    b, a = await asyncio.gather(
        cluster.start("B-inventory", modules="inventory", env=env),
        cluster.start("A-orders", modules=A_MODULES, env=env),
    )
    return a, b


async def test_the_order_flow_works_across_two_processes_and_survives_losing_inventory(cluster: Cluster, db):
    a, b = await split(cluster)
    http = cluster.http

    # -- both registered, each with its modules and where it is reachable -----------------------
    listed = {s["instance_id"]: s for s in await services_cli(cluster)}
    assert listed[a.instance_id]["modules"] == ["notifications", "orders", "payments"]
    assert listed[a.instance_id]["base_url"] == a.url
    assert listed[b.instance_id]["modules"] == ["inventory"]
    assert listed[b.instance_id]["base_url"] == b.url
    assert {s["instance_id"] for s in await admin_services(cluster, a)} == {a.instance_id, b.instance_id}

    # -- each hosts only its modules' routes --------------------------------------------------------
    status, _, level = await call(http, "POST", f"{b.url}/inventory/items", json_body={"sku": "book", "quantity": 10})
    assert status == 201, level
    assert (await call(http, "GET", f"{a.url}/inventory/items/book"))[0] == 404
    assert (await call(http, "POST", f"{b.url}/orders", json_body=order_body("book", 1, "pm_card_ok")))[0] == 404

    # -- paid: reserved on B over HTTP, charged asynchronously on A, committed by B's relay -------
    status, headers, paid, _ = await place(cluster, a, order_body("book", 2, "pm_card_ok"))
    assert status == 201, paid
    await wait_order(cluster, a, paid["order_id"], "paid")
    await wait_stock(cluster, b, "book", available=8, reserved=0)
    status, _, notes = await call(http, "GET", f"{a.url}/notifications?order_id={paid['order_id']}")
    assert status == 200 and [n["kind"] for n in notes] == ["payment_captured"], notes

    # -- declined: the stock comes back, released by B's relay ---------------------------------------
    status, _, declined, _ = await place(cluster, a, order_body("book", 3, "pm_card_declined"))
    assert status == 201, declined
    await wait_order(cluster, a, declined["order_id"], "payment_declined")
    await wait_stock(cluster, b, "book", available=8, reserved=0)
    assert await db.fetchval(
        "SELECT status FROM inventory_reservations WHERE order_id = $1", declined["order_id"]
    ) == "released"
    status, _, notes = await call(http, "GET", f"{a.url}/notifications?order_id={declined['order_id']}")
    assert [n["kind"] for n in notes] == ["payment_declined"], notes
    # each relay delivers only its own modules' rows
    on_a, on_b = await delivered(cluster, a), await delivered(cluster, b)
    assert on_b.get("inventory.release_reservation") == 1 and on_b.get("inventory.commit_reservation") == 1, on_b
    assert not any(s.startswith("inventory.") for s in on_a), on_a
    assert not any(not s.startswith("inventory.") for s in on_b), on_b
    assert on_a.get("payments.charge_order") == 2 and on_a.get("notifications.notify_customer") == 2, on_a

    # -- a rejection on B is the same rejection at A's edge -------------------------------------------
    status, headers, problem, _ = await place(cluster, a, order_body("book", 1000, "pm_card_ok"))
    assert status == 409, problem
    assert headers["Content-Type"].startswith("application/problem+json")
    assert problem["code"] == "InsufficientStock", problem
    status, _, problem, _ = await place(cluster, a, order_body("no-such-sku", 1, "pm_card_ok"))
    assert status == 422 and problem["code"] == "UnknownSku", problem

    # -- kill -9 B: A answers 503 problems within the deadline, then fast with the breaker open ----
    last_beat = await db.fetchval("SELECT heartbeat_at FROM services WHERE instance_id = $1", b.instance_id)
    b.kill()
    killed_at = time.monotonic()
    # a burst of concurrent orders meets the dead instance: each a 503 problem within the deadline
    burst = await asyncio.gather(*(place(cluster, a, order_body("book", 1, "pm_card_ok")) for _ in range(8)))
    for status, headers, _, seconds in burst:
        assert status == 503 and headers["Content-Type"].startswith("application/problem+json"), burst
        assert seconds <= TIMEOUT + SLACK and "Retry-After" in headers, burst
    answers = []
    for _ in range(BREAKER_FAIL_MAX + 2):
        status, headers, problem, seconds = await place(cluster, a, order_body("book", 1, "pm_card_ok"))
        answers.append((status, seconds, problem))
        assert status == 503, answers
        assert headers["Content-Type"].startswith("application/problem+json"), headers
        assert seconds <= TIMEOUT + SLACK, answers
        assert "Retry-After" in headers, headers
        if "circuit open" in problem["detail"]:
            break
    assert "circuit open" in problem["detail"], answers
    assert len(answers) <= BREAKER_FAIL_MAX + 1, answers
    assert "'inventory'" in problem["detail"], problem  # inventory's breaker, not orders'
    status, headers, problem, seconds = await place(cluster, a, order_body("book", 1, "pm_card_ok"))
    assert status == 503 and "circuit open" in problem["detail"], problem
    assert seconds < TIMEOUT / 4, f"the open breaker should answer at once, took {seconds:.2f}s"
    assert 1 <= int(headers["Retry-After"]) <= math.ceil(BREAKER_RESET), headers
    # orders' own reads do not depend on inventory: inventory's outage did not open orders' breaker
    assert await order_status(cluster, a, paid["order_id"]) == "paid"
    status, _, problem = await call(http, "GET", f"{a.url}/orders/{paid['order_id']}")
    assert status == 200, problem

    # -- B is gone from `switchboard services` within 3 heartbeats ---------------------------------
    while True:
        asked_at = time.monotonic()
        listed = {s["instance_id"] for s in await services_cli(cluster)}
        assert a.instance_id in listed, listed
        if b.instance_id not in listed:
            break
        assert asked_at - killed_at <= STALE + SLACK, (
            f"{b.instance_id} still listed {asked_at - killed_at:.2f}s after SIGKILL (last beat {last_beat})"
        )
        await asyncio.sleep(0.05)
    # ... and its row is pruned by A's heartbeat (at most one more interval later)
    await wait_for(
        lambda: db.fetchval("SELECT count(*) = 0 FROM services WHERE instance_id = $1", b.instance_id),
        STALE + HEARTBEAT + SLACK,
        "A's heartbeat to prune B's row",
    )
    assert {s["instance_id"] for s in await admin_services(cluster, a)} == {a.instance_id}

    # -- B again on the same port: A recovers by itself (half-open, then closed) ---------------------
    a_pid = a.process.pid
    await cluster.restart(b)
    back_at = time.monotonic()

    async def accepted():
        status, _, body, _ = await place(cluster, a, order_body("book", 1, "pm_card_ok"))
        return status == 201 and body

    again = await wait_for(accepted, BREAKER_RESET + 2 * SLACK + HEARTBEAT, "A to place orders again", 0.1)
    recovered_in = time.monotonic() - back_at
    assert recovered_in <= BREAKER_RESET + 2 * SLACK + HEARTBEAT, recovered_in
    assert a.process.pid == a_pid and a.process.poll() is None and a.starts == 1  # A never restarted
    await wait_order(cluster, a, again["order_id"], "paid")
    await wait_stock(cluster, b, "book", available=7, reserved=0)
    assert {s["instance_id"] for s in await services_cli(cluster)} == {a.instance_id, b.instance_id}

    # -- graceful shutdown deregisters at once --------------------------------------------------------
    b.signal(signal.SIGTERM)
    assert await asyncio.to_thread(b.process.wait, 15) == 0, b.log()
    assert await db.fetchval("SELECT count(*) FROM services WHERE instance_id = $1", b.instance_id) == 0


async def test_the_internal_endpoint_needs_the_shared_token(cluster: Cluster):
    """B has the shared token; A was given another one (a misconfiguration)."""
    wrong = "not-the-shared-token"
    b, a = await asyncio.gather(
        cluster.start("B-inventory", modules="inventory"),
        cluster.start("A-orders", modules=A_MODULES, env={"SWITCHBOARD_INTERNAL_TOKEN": wrong}),
    )
    http = cluster.http
    await call(http, "POST", f"{b.url}/inventory/items", json_body={"sku": "pen", "quantity": 4})
    url = f"{b.url}/internal/messages/inventory.GetStockLevel"

    for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": INTERNAL_TOKEN},
                    {"Authorization": f"Basic {INTERNAL_TOKEN}"}, {"Authorization": f"Bearer {INTERNAL_TOKEN}x"}):  # fmt: skip
        status, _, body = await call(http, "POST", url, json_body={"sku": "pen"}, headers=headers)
        assert status == 401, (headers, body)
    status, _, body = await call(
        http, "POST", url, json_body={"sku": "pen"}, headers={"Authorization": f"Bearer {INTERNAL_TOKEN}"}
    )
    assert status == 200 and body == {"sku": "pen", "available": 4, "reserved": 0}, body

    # A's calls are refused by B: its clients see the remote module unavailable (503), not a
    # business rejection of their order (409), and nothing is reserved
    status, headers, problem, _ = await place(cluster, a, order_body("pen", 1, "pm_card_ok"))
    assert status == 503 and headers["Content-Type"].startswith("application/problem+json"), problem
    assert (await stock(cluster, b, "pen"))["available"] == 4

    # a process does not run a module it does not host, even when asked with its token
    status, _, body = await call(
        http,
        "POST",
        f"{a.url}/internal/messages/inventory.GetStockLevel",
        json_body={"sku": "pen"},
        headers={"Authorization": f"Bearer {wrong}"},
    )
    assert status == 503, body


async def test_a_hung_inventory_costs_one_deadline_per_call_until_its_breaker_opens(cluster: Cluster):
    """B frozen (SIGSTOP): it still accepts connections, never answers, and stays registered (a
    long heartbeat here), so only the deadline and then the breaker protect A's callers."""
    a, b = await split(cluster, SWITCHBOARD_HEARTBEAT="10")
    await call(cluster.http, "POST", f"{b.url}/inventory/items", json_body={"sku": "mug", "quantity": 10})
    status, _, paid, _ = await place(cluster, a, order_body("mug", 1, "pm_card_ok"))
    assert status == 201, paid

    b.signal(signal.SIGSTOP)
    try:
        answers = []
        for _ in range(BREAKER_FAIL_MAX):
            status, headers, problem, seconds = await place(cluster, a, order_body("mug", 1, "pm_card_ok"))
            answers.append((status, round(seconds, 2), problem))
            assert status == 503 and headers["Content-Type"].startswith("application/problem+json"), answers
            assert TIMEOUT * 0.9 <= seconds <= TIMEOUT + SLACK, answers  # waited the deadline, no longer
        status, headers, problem, seconds = await place(cluster, a, order_body("mug", 1, "pm_card_ok"))
        answers.append((status, round(seconds, 2), problem))
        assert status == 503 and "circuit open" in problem["detail"], answers
        assert seconds < TIMEOUT / 4, answers
        assert 1 <= int(headers["Retry-After"]) <= math.ceil(BREAKER_RESET), headers
        # checked at the end: the breaker that opened should be inventory's, and orders should
        # still answer what it owns (its read model is local)
        opened = problem["detail"]
        read_status, _, read_body = await call(cluster.http, "GET", f"{a.url}/orders/{paid['order_id']}")
        read_while_hung = (read_status, read_body.get("status") if read_status == 200 else read_body.get("detail"))
    finally:
        b.signal(signal.SIGCONT)

    async def accepted():
        status, _, body, _ = await place(cluster, a, order_body("mug", 1, "pm_card_ok"))
        return status == 201

    await wait_for(accepted, BREAKER_RESET + 2 * SLACK, "A to place orders again after SIGCONT", 0.1)

    assert "'inventory'" in opened and read_while_hung == (200, "paid"), (
        f"a hung inventory opened {opened!r}; GET /orders/{{id}} on A meanwhile: {read_while_hung!r}"
    )
