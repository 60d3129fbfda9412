"""`switchboard describe` lists the wiring the real bootstrap builds, without a database."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.bootstrap import load_modules
from app.cli.describe import describe
from app.main import create_app
from app.settings import Settings
from app.wiring import Subscription
from modules.orders.commands import PlaceOrder
from modules.orders.events import OrderPlaced
from modules.payments import handlers as payments_handlers

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "postgresql://nobody@127.0.0.1:1/nothing"  # a connection attempt would fail loudly


def switchboard(*args: str, data_dir: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_") and k != "DATABASE_URL"}
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT, env={**base, "SWITCHBOARD_DATA_DIR": str(data_dir), **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("describe") / "data"  # an embedded server would create it


@pytest.fixture(scope="module")
def text(data_dir) -> str:
    result = switchboard("describe", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def wiring(data_dir) -> dict[str, Any]:
    result = switchboard("describe", "--json", data_dir=data_dir, DATABASE_URL=UNREACHABLE)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def real_routes() -> set[tuple[str, str]]:
    app = create_app(Settings(instance_id="describe-test"), run_relay=False)
    return {
        (method, route.path)
        for route in app.routes
        for handler in route.route_handlers
        for method in handler.http_methods
        if method != "OPTIONS"
    }


def test_describe_starts_no_database(text, wiring, data_dir):
    assert not data_dir.exists()  # no embedded server was started, and the unreachable URL was not tried


def test_the_text_names_every_command_and_query_with_its_handler_and_deadline(text):
    for module in load_modules():
        for message_type, handler in {**module.commands, **module.queries}.items():
            name = re.escape(f"{module.name}.{message_type.__name__}")
            path = re.escape(f"{handler.__module__}.{handler.__qualname__}")
            assert re.search(rf"^  {name} +(command|query) +here +5s +{path}$", text, re.MULTILINE), name


def test_the_text_names_every_subscription_with_its_events_and_retry_policy(text):
    assert re.search(
        r"^  payments\.charge_order +orders\.OrderPlaced +here +5 +0\.5s +60s +modules\.payments\.handlers\.fail_payment +modules\.payments\.handlers\.charge_order$",
        text, re.MULTILINE,
    ), text  # fmt: skip
    assert re.search(
        r"^  notifications\.notify_customer +payments\.PaymentCaptured, payments\.PaymentDeclined, payments\.PaymentFailed +here +8 +0\.5s +60s +- ",
        text, re.MULTILINE,
    ), text  # fmt: skip
    for module in load_modules():
        for subs in module.subscriptions.values():
            for sub in subs:
                assert re.search(rf"^  {re.escape(sub.name)} ", text, re.MULTILINE), sub.name


def test_the_text_names_the_background_tasks(text):
    assert re.search(r"^  inventory +here +modules\.inventory\.handlers\.release_orphaned_reservations$", text, re.M)


def test_the_text_names_every_http_route(text):
    routes = real_routes()
    assert ("POST", "/orders") in routes and ("GET", "/schema/swagger") in routes
    for method, path in routes:
        assert re.search(rf"^  {method} +{re.escape(path)} +\S", text, re.MULTILINE), (method, path)
    assert re.search(r"^  POST +/orders +modules\.orders\.api\.OrderController\.place$", text, re.MULTILINE)


def test_json_lists_the_same_wiring(wiring):
    charge = next(s for s in wiring["subscriptions"] if s["name"] == "payments.charge_order")
    assert charge == {
        "name": "payments.charge_order",
        "module": "payments",
        "hosted": True,
        "events": ["orders.OrderPlaced"],
        "retired": False,
        "handler": "modules.payments.handlers.charge_order",
        "max_attempts": 5,
        "retry_base_seconds": 0.5,
        "retry_cap_seconds": 60.0,
        "compensation": "modules.payments.handlers.fail_payment",
        "from_jetstream": [],  # no broker: every event through this database's outbox
    }
    assert {m["name"] for m in wiring["modules"]} == {m.name for m in load_modules()}
    assert all(m["hosted"] for m in wiring["modules"])
    assert {(r["method"], r["path"]) for r in wiring["routes"]} == real_routes()
    assert {"message": "inventory.ReserveStock", "kind": "command", "module": "inventory", "hosted": True,
            "handler": "modules.inventory.handlers.reserve_stock", "deadline_seconds": 5.0} in wiring["messages"]  # fmt: skip


def test_modules_flag_marks_the_others_remote_and_serves_only_their_routes(data_dir):
    result = switchboard("describe", "--modules", "orders", "--json", data_dir=data_dir)

    assert result.returncode == 0, result.stderr
    wiring = json.loads(result.stdout)
    assert {m["name"]: m["hosted"] for m in wiring["modules"]} == {
        "inventory": False, "orders": True, "payments": False, "notifications": False,
    }  # fmt: skip
    reserve = next(m for m in wiring["messages"] if m["message"] == "inventory.ReserveStock")
    assert reserve["hosted"] is False
    # inventory's sweeper runs elsewhere; orders' expired-key sweep runs here
    assert {t["module"]: t["hosted"] for t in wiring["background"]} == {"inventory": False, "orders": True}
    paths = {r["path"] for r in wiring["routes"]}
    assert "/orders" in paths and "/inventory/items" not in paths


def test_modules_flag_marks_remote_modules_in_the_text(data_dir):
    result = switchboard("describe", "--modules", "orders", data_dir=data_dir)

    assert result.returncode == 0, result.stderr
    assert re.search(r"^  inventory +remote +2 +1 +3 +1$", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^  orders +here ", result.stdout, re.MULTILINE)


def test_the_environment_chooses_the_hosted_modules_and_the_default_deadline(data_dir):
    result = switchboard(
        "describe", "--json", data_dir=data_dir, SWITCHBOARD_MODULES="inventory", SWITCHBOARD_TIMEOUT="2.5"
    )

    assert result.returncode == 0, result.stderr
    wiring = json.loads(result.stdout)
    assert [m["name"] for m in wiring["modules"] if m["hosted"]] == ["inventory"]
    assert {m["deadline_seconds"] for m in wiring["messages"]} == {2.5}


def test_an_unknown_module_is_one_line_and_exit_2(data_dir):
    result = switchboard("describe", "--modules", "shipping", data_dir=data_dir)

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["switchboard: SWITCHBOARD_MODULES names unknown modules: ['shipping']"]


def test_a_message_with_its_own_timeout_shows_it_as_its_deadline(monkeypatch):
    monkeypatch.setattr(PlaceOrder, "timeout", 12.0)

    wiring = describe(Settings(instance_id="describe-test"))

    place = next(m for m in wiring["messages"] if m["message"] == "orders.PlaceOrder")
    assert place["deadline_seconds"] == 12.0


async def refund(event, uow) -> None: ...


def test_a_subscription_with_a_compensation_shows_its_handler(monkeypatch):
    from modules.payments.module import module as payments

    sub = Subscription("payments.charge_order", payments_handlers.charge_order, max_attempts=5,
                                  on_dead_letter=refund)  # fmt: skip
    monkeypatch.setitem(payments.subscriptions, OrderPlaced, [sub])

    wiring = describe(Settings(instance_id="describe-test"))

    charge = next(s for s in wiring["subscriptions"] if s["name"] == "payments.charge_order")
    assert charge["compensation"] == f"{__name__}.refund"


def test_with_a_broker_the_subscriptions_fed_through_jetstream_say_so(data_dir):
    result = switchboard("describe", "--modules", "orders,inventory", "--json", data_dir=data_dir,
                         SWITCHBOARD_NATS_URL="nats://127.0.0.1:1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    subs = {s["name"]: s for s in json.loads(result.stdout)["subscriptions"]}
    assert subs["orders.mark_order_paid"]["from_jetstream"] == ["payments.PaymentCaptured"]  # B's event
    assert subs["payments.charge_order"]["from_jetstream"] == ["orders.OrderPlaced"]  # remote: all of it
    assert subs["orders.project_order_view"]["from_jetstream"] == []  # retired: its own old rows

    text = switchboard("describe", "--modules", "orders,inventory", data_dir=data_dir,
                       SWITCHBOARD_NATS_URL="nats://127.0.0.1:1").stdout  # fmt: skip
    assert re.search(r"payments\.charge_order\s+orders\.OrderPlaced\s+remote \(via JetStream\)", text), text
    assert re.search(r"orders\.mark_order_paid\s+payments\.PaymentCaptured\s+here \(via JetStream\)", text), text
    without = json.loads(switchboard("describe", "--json", data_dir=data_dir).stdout)
    assert all(s["from_jetstream"] == [] for s in without["subscriptions"])
