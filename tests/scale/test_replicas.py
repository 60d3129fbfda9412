"""Identical replicas on one database: three `serve` processes hosting every module, orders
spread round-robin across them; every order settles, every effect happens exactly once, also
when one replica is killed with SIGKILL in the middle of the load and started again."""

from __future__ import annotations

import asyncio
import time

from tests.scale.conftest import Cluster, call, wait_for
from tests.scale.load import METHODS, Load, add_stock, assert_exactly_once, place_orders, wait_settled

ORDERS = 320
SKUS = [f"sku-{n}" for n in range(40)]
STOCK = 100
SETTLE_TIMEOUT = 60
# A longer deadline than the split tests': a PlaceOrder slowed past 2 s by a busy 2-core machine
# (three servers, PostgreSQL, a restarting replica) would be a 503, not what these tests are about.
REPLICA_ENV = {"SWITCHBOARD_TIMEOUT": "5"}


async def test_three_replicas_settle_every_order_exactly_once(cluster: Cluster, db):
    replicas = await cluster.start_many(["replica-1", "replica-2", "replica-3"], env=REPLICA_ENV)
    await add_stock(cluster.http, replicas[0], SKUS, STOCK)

    started = time.monotonic()
    load = await place_orders(cluster.http, replicas, ORDERS, SKUS)
    placed_in = time.monotonic() - started

    assert not load.refused and not load.unreachable, (load.refused[:5], load.unreachable[:5])
    assert len(load.accepted) == ORDERS
    assert set(load.by_server.values()) == {ORDERS // 3, ORDERS // 3 + 1}, load.by_server  # round-robin
    await wait_settled(db, SETTLE_TIMEOUT)
    outcome = await assert_exactly_once(db, load.accepted, orphans_allowed=False)
    print(f"{ORDERS} orders placed in {placed_in:.1f}s, settled after {time.monotonic() - started:.1f}s: {outcome}")

    # every delivery ran in one of the replicas' relays, and all three took part
    delivered = {}
    for replica in replicas:
        _, _, text = await call(cluster.http, "GET", f"{replica.url}/metrics")
        delivered[replica.name] = sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("switchboard_relay_delivered_total{")
        )
    assert all(delivered.values()), delivered

    # stock: paid orders took theirs; declined ones gave it back, and so did broken ones (their
    # dead-lettered charge was compensated: PaymentFailed released the hold)
    by_sku: dict[str, list[str]] = {sku: [] for sku in SKUS}
    for i in range(ORDERS):
        by_sku[SKUS[i % len(SKUS)]].append(METHODS[i % len(METHODS)])
    for n, sku in enumerate(SKUS):
        _, _, level = await call(cluster.http, "GET", f"{replicas[n % 3].url}/inventory/items/{sku}")
        taken = sum(m in ("pm_card_ok", "pm_card_flaky") for m in by_sku[sku])
        assert (level["available"], level["reserved"]) == (STOCK - taken, 0), (sku, level, by_sku[sku])


async def test_a_replica_killed_mid_load_loses_no_accepted_order(cluster: Cluster, db):
    replicas = await cluster.start_many(["replica-1", "replica-2", "replica-3"], env=REPLICA_ENV)
    victim = replicas[1]
    await add_stock(cluster.http, replicas[0], SKUS, STOCK)

    load = Load()
    answered_third = asyncio.Event()

    def on_answer(state: Load) -> None:
        if state.done >= ORDERS // 3:
            answered_third.set()

    async def crash_and_restart() -> dict:
        await answered_third.wait()
        inflight = await db.fetchval(
            "SELECT count(*) FROM outbox WHERE status = 'pending' AND locked_by = $1", victim.instance_id
        )
        accepted_before = load.by_server[victim.name]
        old_instance = victim.instance_id
        victim.kill()  # SIGKILL, whole process group
        killed_at = time.monotonic()
        await cluster.restart(victim)  # same port
        return {
            "held_rows_at_kill": inflight,
            "accepted_before_kill": accepted_before,
            "restarted_after": round(time.monotonic() - killed_at, 1),
            "old_instance": old_instance,
            "restarted_at": time.monotonic(),
        }

    crash = asyncio.create_task(crash_and_restart())
    await place_orders(cluster.http, replicas, ORDERS, SKUS, load=load, on_answer=on_answer)
    crashed = await crash
    # more load once it is back, so the restarted replica serves (and relays) too
    await place_orders(cluster.http, replicas, 60, SKUS, load=load, start=ORDERS)
    after_restart = sum(1 for at, name in load.accepted_at if name == victim.name and at > crashed["restarted_at"])

    print(
        f"crash: {crashed}; accepted {len(load.accepted)} ({dict(load.by_server)}), "
        f"unreachable {len(load.unreachable)}, refused {len(load.refused)}: {load.refused[:3]}"
    )
    assert load.unreachable, "no request met the killed replica: the kill was not mid-load"
    assert {server for server, _ in load.unreachable} == {victim.name}, load.unreachable[:5]
    assert not [r for r in load.refused if r[0] != victim.name], load.refused[:5]  # the others were fine
    assert after_restart > 0, "the restarted replica accepted nothing"

    await wait_settled(db, SETTLE_TIMEOUT)
    outcome = await assert_exactly_once(db, load.accepted, orphans_allowed=True)
    print(f"outcome: {outcome}")
    # the dead instance left the registry; the restarted one is there
    await wait_for(
        lambda: db.fetchval("SELECT count(*) = 0 FROM services WHERE instance_id = $1", crashed["old_instance"]),
        10,
        "the killed instance to be pruned",
    )
    live = {r["instance_id"] for r in await db.fetch("SELECT instance_id FROM services")}
    assert live == {r.instance_id for r in replicas}, live
