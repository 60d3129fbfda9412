"""Issue 15's chaos test: orders flow from group A (orders, inventory) through a 3-node JetStream
cluster to group B (payments, notifications; two replicas) and their outcomes back, while one
NATS node -- the stream's leader -- and one B replica are SIGKILLed and started again. Every
accepted order must reach its final status, no effect may happen twice, and nothing may be left
unacknowledged in JetStream or pending in either outbox."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import msgspec
import nats
import pytest

from app.broker.stream import STREAM
from tests.broker.conftest import Node
from tests.broker.test_split_databases import KIND, OUTCOMES, settled, start_groups
from tests.scale.conftest import Cluster, Server, call, order_body, wait_for

RATE = 12.0  # orders per second placed on A
BEFORE = 18  # orders accepted before the kills
GAP = 6  # orders accepted between the node's kill and the replica's
DURING = 12  # orders accepted while the node and the replica are down
AFTER = 12  # orders placed once both are back
SKUS = ("widget", "gadget", "gizmo")  # a few Stock streams: requests and deliveries contend less
STOCK = 1000
SETTLE = 60.0  # the whole chaos test stays under it on a shared 2-core machine
METHODS = list(OUTCOMES)
PAYMENT_EVENT = {"paid": "payments.PaymentCaptured", "payment_declined": "payments.PaymentDeclined",
                 "payment_failed": "payments.PaymentFailed"}  # fmt: skip


@pytest.fixture
async def js(nats_cluster) -> AsyncIterator:
    nc = await nats.connect(nats_cluster.urls)
    yield nc.jetstream()
    await nc.close()


@dataclass
class Load:
    accepted: dict[str, str] = field(default_factory=dict)  # order id -> payment method (201s)
    refused: Counter = field(default_factory=Counter)  # clean problem answers (4xx, 503) by status
    wrong: list[tuple[int, str, object]] = field(default_factory=list)  # anything else
    placed: int = 0
    stop_after: int | None = None  # placed orders at which the load ends (set once the chaos is over)
    began: float = field(default_factory=time.monotonic)
    timeline: list[str] = field(default_factory=list)

    def mark(self, what: str) -> None:
        self.timeline.append(f"{time.monotonic() - self.began:5.1f}s {what} ({len(self.accepted)} accepted)")


async def place(http: aiohttp.ClientSession, a: Server, i: int, load: Load) -> None:
    method = METHODS[i % len(METHODS)]
    body = order_body(SKUS[i // len(METHODS) % len(SKUS)], 1, method, customer=f"c-{i}")
    try:
        status, headers, answer = await call(http, "POST", f"{a.url}/orders", json_body=body, timeout=20)
    except (aiohttp.ClientError, TimeoutError) as error:
        load.wrong.append((0, type(error).__name__, str(error)))
        return
    if status == 201:
        load.accepted[answer["order_id"]] = method
    elif (400 <= status < 500 or status == 503) and headers.get("Content-Type", "").startswith("application/problem+json"):
        load.refused[status] += 1
    else:
        load.wrong.append((status, headers.get("Content-Type", ""), answer))


async def steady_load(http: aiohttp.ClientSession, a: Server, load: Load) -> None:
    """RATE orders a second, each in its own task (a slow answer does not slow the rate), until
    `stop_after` orders were placed."""
    started = time.monotonic()
    tasks = []
    while load.stop_after is None or load.placed < load.stop_after:
        due = started + load.placed / RATE
        await asyncio.sleep(max(0.0, due - time.monotonic()))  # the load's pace, not a synchronisation
        tasks.append(asyncio.create_task(place(http, a, load.placed, load)))
        load.placed += 1
    await asyncio.gather(*tasks)


async def connected_node(http: aiohttp.ClientSession, nodes: list[Node], instance_id: str) -> Node | None:
    """The NATS node a switchboard process (its client is named by its instance id) is connected to."""
    for node in nodes:
        async with http.get(f"http://127.0.0.1:{node.monitor_port}/connz") as response:
            connz = await response.json()
        if any(c.get("name") == instance_id for c in connz.get("connections") or []):
            return node
    return None


async def chaos(cluster: Cluster, nats_cluster, js, b: list[Server], load: Load) -> tuple[Node, Server]:
    """Once BEFORE orders are in: SIGKILL the stream's leader node, then (GAP orders later) a B
    replica -- the one on another node, if any, so that the surviving replica loses its node;
    start both again once DURING more orders were accepted. The load goes on until both are back
    and AFTER more orders were placed."""
    await wait_for(lambda: _at_least(len(load.accepted), BEFORE), SETTLE, f"{BEFORE} orders accepted")
    leader = (await js.stream_info(STREAM)).cluster.leader
    node = next(n for n in nats_cluster.nodes if n.name == leader)
    on_leader = [r for r in b if await connected_node(cluster.http, nats_cluster.nodes, r.instance_id) is node]
    replica = next((r for r in b if r not in on_leader), b[0])
    on = ", ".join(r.name for r in on_leader) or "no B replica"
    load.mark(f"killing {node.name} (the stream's leader; {on} connected to it)")
    await asyncio.to_thread(node.kill)
    # The replica dies a moment later, while the consumers whose leader was on that node elect
    # another: it may die holding a message whose effects are committed but whose ack found no
    # answer yet, which the other replica then gets again (and its inbox must absorb).
    killed_at = len(load.accepted)
    await wait_for(lambda: _at_least(len(load.accepted), killed_at + GAP), SETTLE, f"{GAP} orders accepted")
    load.mark(f"killing {replica.name}")
    await asyncio.to_thread(replica.kill)
    down_at = len(load.accepted)
    await wait_for(lambda: _at_least(len(load.accepted), down_at + DURING), SETTLE, f"{DURING} orders accepted meanwhile")
    node.restart()
    load.mark(f"restarting {node.name} and {replica.name}")
    await asyncio.gather(node.wait_current(cluster.http), cluster.restart(replica))
    load.mark("both back")
    load.stop_after = load.placed + AFTER
    return node, replica


async def _at_least(value: int, floor: int) -> bool:
    return value >= floor


async def test_killing_a_nats_node_and_a_b_replica_under_load_loses_and_repeats_nothing(
    nats_cluster, cluster, js, db, clean_b, database_url_b
):
    a, b = await start_groups(cluster, nats_cluster, database_url_b)
    for sku in SKUS:
        status, _, body = await call(cluster.http, "POST", f"{a.url}/inventory/items", json_body={"sku": sku, "quantity": STOCK})
        assert status == 201, body

    load = Load()
    loading = asyncio.create_task(steady_load(cluster.http, a, load))
    try:
        node, replica = await chaos(cluster, nats_cluster, js, b, load)
        await loading
    finally:
        loading.cancel()
    load.mark("load over")
    assert replica.starts == 2 and node.process is not None and node.process.poll() is None
    assert not load.wrong, f"answers that are neither 201 nor a clean problem: {load.wrong[:5]}"

    # every order at its final status on A: the accepted ones, and any other A holds
    async def final() -> bool:
        rows = await db.fetch("SELECT status, payment_method FROM orders_view")
        return all(r["status"] == OUTCOMES[r["payment_method"]] for r in rows)

    await wait_for(final, SETTLE, "every order at its final status on A", interval=0.2)
    load.mark("every order final")
    view = {r["id"]: r for r in await db.fetch("SELECT order_id::text AS id, status, payment_method, items FROM orders_view")}
    assert set(load.accepted) <= set(view)
    assert {o: view[o]["payment_method"] for o in load.accepted} == load.accepted
    expected = {order: row["status"] for order, row in view.items()}

    await payments_and_notifications_once(clean_b, expected)
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0

    # nothing unacknowledged in JetStream (an order is final once orders applied its payment
    # outcome; inventory's consumers of the same event may still be behind), then the stock moves
    await wait_for(lambda: settled(js), SETTLE, "every JetStream consumer with nothing pending or unacknowledged")
    await stock_moved_once(cluster, a, db, view, refused=sum(load.refused.values()))
    for side in (db, clean_b):
        left = await side.fetch("SELECT subscriber, status, count(*) FROM outbox WHERE status NOT IN ('delivered', 'dead') GROUP BY 1, 2")
        assert not left, [dict(r) for r in left]
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE status = 'dead'") == 0
    broken = sum(1 for s in expected.values() if s == "payment_failed")
    assert await clean_b.fetchval("SELECT count(*) FROM outbox WHERE status = 'dead'") == broken
    load.mark(f"checked; refused {dict(load.refused)}")
    print("\n".join(["chaos:", *load.timeline]))


async def payments_and_notifications_once(b, expected: dict[str, str]) -> None:
    """On B: one payment outcome per order (its Payment stream), of the right kind; each
    notification exactly once; each broken card's charge parked once."""
    outcomes = await b.fetch("SELECT data->>'order_id' AS id, type FROM events WHERE type LIKE 'payments.%'")
    assert Counter(r["id"] for r in outcomes) == Counter(list(expected))
    assert {r["id"]: r["type"] for r in outcomes} == {o: PAYMENT_EVENT[s] for o, s in expected.items()}
    sent = await b.fetch("SELECT order_id::text AS id, kind FROM notifications_sent")
    assert Counter(r["id"] for r in sent) == Counter(list(expected))
    assert {r["id"]: r["kind"] for r in sent} == {o: KIND[s] for o, s in expected.items()}
    letters = await b.fetch("SELECT subscriber, status, payload->>'order_id' AS id FROM dead_letters")
    assert sorted((r["subscriber"], r["status"], r["id"]) for r in letters) == sorted(
        ("payments.charge_order", "parked", o) for o, s in expected.items() if s == "payment_failed")  # fmt: skip


async def stock_moved_once(cluster: Cluster, a: Server, db, view: dict, refused: int) -> None:
    """On A: each paid order's hold committed once, every other order's released once; per SKU,
    available = stock - paid - orphans, reserved = orphans. An orphan is the hold of an order that
    was never placed (its request was refused after ReserveStock, under load): held until the
    reservation TTL's sweep, as designed."""
    paid = sorted(o for o, row in view.items() if row["status"] == "paid")
    moves = await db.fetch(
        "SELECT data->>'order_id' AS id, type FROM events WHERE type IN"
        " ('inventory.ReservationCommitted', 'inventory.ReservationReleased', 'inventory.ReservationRetaken')"
    )
    assert sorted(r["id"] for r in moves if r["type"] == "inventory.ReservationCommitted") == paid
    assert sorted(r["id"] for r in moves if r["type"] == "inventory.ReservationReleased") == sorted(set(view) - set(paid))
    assert not [r for r in moves if r["type"] == "inventory.ReservationRetaken"]
    holds = await db.fetch("SELECT order_id::text AS id, sku, quantity, status FROM inventory_reservations")
    placed = [h for h in holds if h["id"] in view]
    assert {(h["id"], h["status"]) for h in placed} == {(o, "committed" if o in paid else "released") for o in view}
    orphans = [h for h in holds if h["id"] not in view]
    assert {h["status"] for h in orphans} <= {"reserved"} and len({h["id"] for h in orphans}) <= refused
    sold, held = Counter(), Counter()
    for order in paid:
        for item in msgspec.json.decode(view[order]["items"]) if isinstance(view[order]["items"], str) else view[order]["items"]:
            sold[item["sku"]] += item["quantity"]
    for hold in orphans:
        held[hold["sku"]] += hold["quantity"]
    for sku in SKUS:
        status, _, level = await call(cluster.http, "GET", f"{a.url}/inventory/items/{sku}")
        assert (status, level["available"], level["reserved"]) == (200, STOCK - sold[sku] - held[sku], held[sku]), sku
