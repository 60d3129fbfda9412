"""Order load against real replicas, and the end-state checks of the replica and crash tests."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from app.bootstrap import load_modules
from app.db import Database
from tests.scale.conftest import Server, call, order_body, wait_for

METHODS = ("pm_card_ok", "pm_card_declined", "pm_card_flaky", "pm_card_broken")
FINAL = {
    "pm_card_ok": "paid",
    "pm_card_flaky": "paid",
    "pm_card_declined": "payment_declined",
    "pm_card_broken": "payment_failed",
}
BROKEN = "pm_card_broken"  # its charge ends in dead_letters, compensated: PaymentFailed ends the order
CHARGE = "payments.charge_order"


@dataclass
class Load:
    accepted: dict[str, str] = field(default_factory=dict)  # order id -> payment method (201s)
    refused: list[tuple[str, int, object]] = field(default_factory=list)  # (server, status, body): other answers
    unreachable: list[tuple[str, str]] = field(default_factory=list)  # (server, error): no HTTP answer
    by_server: Counter = field(default_factory=Counter)  # 201s per server
    accepted_at: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, server)
    sent: int = 0

    @property
    def done(self) -> int:
        return len(self.accepted) + len(self.refused) + len(self.unreachable)


async def place_orders(
    http: aiohttp.ClientSession,
    servers: Sequence[Server],
    count: int,
    skus: Sequence[str],
    *,
    concurrency: int = 12,
    load: Load | None = None,
    start: int = 0,
    on_answer: Callable[[Load], None] | None = None,
) -> Load:
    """`count` orders, the i-th to servers[i % n] with METHODS[i % 4], at most `concurrency` in flight."""
    load = load if load is not None else Load()
    numbers = iter(range(start, start + count))

    async def worker() -> None:
        for i in numbers:
            server = servers[i % len(servers)]
            method = METHODS[i % len(METHODS)]
            body = order_body(skus[i % len(skus)], 1, method, customer=f"c-{i}")
            load.sent += 1
            try:
                status, _, answer = await call(http, "POST", f"{server.url}/orders", json_body=body, timeout=15)
            except (aiohttp.ClientConnectionError, TimeoutError) as error:
                load.unreachable.append((server.name, f"{type(error).__name__}: {error}"))
            else:
                if status == 201:
                    load.accepted[answer["order_id"]] = method
                    load.by_server[server.name] += 1
                    load.accepted_at.append((time.monotonic(), server.name))
                else:
                    load.refused.append((server.name, status, answer))
            if on_answer is not None:
                on_answer(load)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return load


async def add_stock(http: aiohttp.ClientSession, server: Server, skus: Sequence[str], quantity: int) -> None:
    for sku in skus:
        status, _, body = await call(http, "POST", f"{server.url}/inventory/items", json_body={"sku": sku, "quantity": quantity})
        assert status == 201, body


async def wait_settled(db: Database, timeout: float) -> None:
    """Until every outbox row is delivered or dead: every delivery has ended (acknowledged or
    dead-lettered). A fixpoint: a handler's new events are written in its own transaction."""

    async def settled():
        return await db.fetchval("SELECT count(*) = 0 FROM outbox WHERE status NOT IN ('delivered', 'dead')")

    async def summary():
        rows = await db.fetch(
            "SELECT subscriber, status, count(*) AS n FROM outbox WHERE status <> 'delivered' GROUP BY 1, 2 ORDER BY 1, 2"
        )
        return [tuple(r) for r in rows]

    try:
        await wait_for(settled, timeout, "every outbox row to be delivered or dead", interval=0.1)
    except AssertionError as error:
        raise AssertionError(f"{error}; undelivered now: {await summary()}") from None


def subscriptions() -> dict[str, set[str]]:
    """subscriber name -> event topics it receives, from the modules' own wiring."""
    topics: dict[str, set[str]] = defaultdict(set)
    for module in load_modules():
        for event_type, subs in module.subscriptions.items():
            for sub in subs:
                topics[sub.name].add(event_type.topic())
    return dict(topics)


def _sample(items, n: int = 5) -> list:
    return list(itertools.islice(items, n))


async def assert_exactly_once(db: Database, accepted: dict[str, str], *, orphans_allowed: bool) -> dict[str, int]:
    """Every accepted order reached its final state, and every effect happened exactly once.
    `orphans_allowed`: orders may exist that no client saw accepted (a replica died before
    answering); they must settle like the others. Returns counts by outcome."""
    placed = {
        r["order_id"]: (r["event_id"], r["method"])
        for r in await db.fetch(
            "SELECT data->>'order_id' AS order_id, event_id, data->>'payment_method' AS method"
            " FROM events WHERE type = 'orders.OrderPlaced'"
        )
    }
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'orders.OrderPlaced'") == len(placed)
    lost = set(accepted) - set(placed)
    assert not lost, f"{len(lost)} accepted orders have no OrderPlaced: {_sample(lost)}"
    extra = set(placed) - set(accepted)
    assert orphans_allowed or not extra, f"{len(extra)} orders no client saw accepted: {_sample(extra)}"
    methods = {order_id: method for order_id, (_, method) in placed.items()}
    assert all(methods[o] == m for o, m in accepted.items())
    problems: list[str] = []  # every check runs; all failures are reported together

    # -- final status of every order ------------------------------------------------------------------
    views = {str(r["order_id"]): r["status"] for r in await db.fetch("SELECT order_id, status FROM orders_view")}
    letters = {
        str(r["message_id"]): r for r in await db.fetch("SELECT message_id, subscriber, status, compensation, error_message FROM dead_letters")
    }
    wrong: Counter = Counter()
    examples: dict = {}
    for order_id, (event_id, method) in placed.items():
        expected = FINAL.get(method, "placed")
        letter = letters.get(str(event_id))
        ok = views.get(order_id) == expected
        if method == BROKEN:
            ok = ok and letter is not None and letter["subscriber"] == CHARGE and letter["status"] == "parked"
            ok = ok and letter["compensation"] == "compensated"
        elif letter is not None:
            ok = False
        if not ok:
            key = (method, views.get(order_id), letter and letter["subscriber"])
            wrong[key] += 1
            examples.setdefault(key, (order_id, letter and letter["error_message"]))
    if wrong:
        problems.append(
            "orders not in their final state, by (method, orders_view status, dead letter of): "
            f"{dict(wrong)}; examples: {examples}"
        )

    # -- each fact recorded once per order ------------------------------------------------------------
    per_order = Counter(
        (r["order_id"], r["type"])
        for r in await db.fetch(
            "SELECT data->>'order_id' AS order_id, type FROM events WHERE type <> 'inventory.StockAdded'"
        )
    )
    once = {
        "pm_card_ok": ("payments.PaymentCaptured", "orders.OrderPaid", "inventory.ReservationCommitted"),
        "pm_card_flaky": ("payments.PaymentCaptured", "orders.OrderPaid", "inventory.ReservationCommitted"),
        "pm_card_declined": ("payments.PaymentDeclined", "orders.OrderPaymentDeclined", "inventory.ReservationReleased"),
        BROKEN: ("payments.PaymentFailed", "orders.OrderPaymentFailed", "inventory.ReservationReleased"),
    }
    every = {"payments.PaymentCaptured", "payments.PaymentDeclined", "orders.OrderPaid", "orders.OrderPaymentDeclined",
             "inventory.ReservationCommitted", "inventory.ReservationReleased",
             "payments.PaymentFailed", "orders.OrderPaymentFailed"}  # fmt: skip
    bad = []
    for order_id, method in methods.items():
        if per_order[(order_id, "inventory.StockReserved")] != 1:
            bad.append((order_id, "inventory.StockReserved", per_order[(order_id, "inventory.StockReserved")]))
        for topic in every:
            want = 1 if topic in once[method] else 0
            if per_order[(order_id, topic)] != want:
                bad.append((order_id, method, topic, per_order[(order_id, topic)]))
    if bad:
        problems.append(f"{len(bad)} facts recorded a wrong number of times: {bad[:10]}")

    # -- applied: each (subscriber, message) once, exactly the messages each subscriber should get. A
    # delivery's effects commit with its acknowledgement (app/relay/ack.py), so the delivered outbox
    # rows are the applied messages; no inbox row is written for them ----------------------------------
    dead_by_subscriber: dict[str, set[str]] = defaultdict(set)
    for message_id, letter in letters.items():
        dead_by_subscriber[letter["subscriber"]].add(message_id)
    events_by_type: dict[str, set[str]] = defaultdict(set)
    for r in await db.fetch("SELECT type, event_id FROM events"):
        events_by_type[r["type"]].add(str(r["event_id"]))
    inbox: dict[str, list[str]] = defaultdict(list)
    for r in await db.fetch("SELECT subscriber, message_id FROM outbox WHERE status = 'delivered'"):
        inbox[r["subscriber"]].append(str(r["message_id"]))
    counts = {}
    for subscriber, topics in subscriptions().items():
        expected = set().union(*(events_by_type[t] for t in topics)) - dead_by_subscriber[subscriber]
        got = inbox.pop(subscriber, [])
        counts[subscriber] = len(got)
        if len(got) != len(set(got)):
            problems.append(f"{subscriber}: a message delivered twice")
        if set(got) != expected:
            problems.append(
                f"{subscriber}: {len(got)} delivered, {len(expected)} expected; "
                f"missing {_sample(expected - set(got))}, unexpected {_sample(set(got) - expected)}"
            )
    if inbox:
        problems.append(f"deliveries to unknown subscribers: {list(inbox)}")
    if await db.fetchval("SELECT count(*) FROM inbox"):
        problems.append("inbox rows written for outbox deliveries")

    # -- notifications: one per payment outcome, none twice -------------------------------------------
    sent = Counter(
        (r["order_id"], r["kind"]) for r in await db.fetch("SELECT order_id::text, kind FROM notifications_sent")
    )
    kinds = {"paid": "payment_captured", "payment_declined": "payment_declined", "payment_failed": "payment_failed"}
    expected_sent = Counter({(o, kinds[FINAL[m]]): 1 for o, m in methods.items() if m in FINAL})
    if sent != expected_sent:
        problems.append(
            f"notifications: {sum(sent.values())} sent, {len(expected_sent)} expected; "
            f"duplicated {_sample(k for k, n in sent.items() if n > 1)}, "
            f"missing {_sample(k for k in expected_sent if k not in sent)}"
        )
    if not await db.fetchval("SELECT count(DISTINCT message_id) = count(*) FROM notifications_sent"):
        problems.append("notifications_sent: a message reported twice")

    # -- the outbox: every row delivered, except the broken cards' dead charges ---------------------------
    broken_events = {str(event_id) for event_id, method in placed.values() if method == BROKEN}
    left = await db.fetch("SELECT subscriber, status, message_id FROM outbox WHERE status <> 'delivered'")
    if not {(r["subscriber"], r["status"]) for r in left} <= {(CHARGE, "dead")}:
        problems.append(f"outbox rows left besides dead charges: {[tuple(r) for r in left][:10]}")
    if {str(r["message_id"]) for r in left} != broken_events:
        problems.append(f"outbox: {len(left)} rows left, {len(broken_events)} broken cards' charges expected")
    letter_rows = await db.fetchval("SELECT count(*) FROM dead_letters")
    if set(letters) != broken_events or letter_rows != len(broken_events):
        problems.append(
            f"dead_letters: {letter_rows} rows, one per broken card ({len(broken_events)}) expected; "
            f"unexpected: {_sample((letters[m]['subscriber'], m) for m in set(letters) - broken_events)}"
        )
    assert not problems, "\n".join(problems)

    outcome = Counter(FINAL.get(m, "dead-lettered") for m in methods.values())
    return {**outcome, "orders": len(placed), **{f"delivered {k}": v for k, v in counts.items()}}
