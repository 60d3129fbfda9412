"""Hostile bytes and out-of-rule messages get a 4xx problem and change nothing, whichever door
they come through: the HTTP edge (`POST /orders`, `POST /inventory/items`) or another instance's
door, `POST /internal/messages/{module}.{Type}` with the internal token."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from litestar.testing import TestClient

from app.main import create_app
from tests.test_api_errors import FUZZ, assert_problem, order

TOKEN = "internal-test-token"
INTERNAL = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
JSON = {"content-type": "application/json"}
DEEP = b"[" * 1000 + b"]" * 1000


@pytest.fixture
def settings(base_settings):
    return replace(base_settings, internal_token=TOKEN)


@pytest.fixture
async def stocked(client, db):
    """`widget` in stock; returns what the database holds, to compare after the hostile request."""
    assert (await client.post("/inventory/items", json={"sku": "widget", "quantity": 5})).status_code == 201
    return await state(db)


async def state(db) -> tuple:
    return (
        await db.fetchval("SELECT count(*) FROM events"),
        await db.fetchval("SELECT count(*) FROM outbox"),
        await db.fetch("SELECT * FROM events ORDER BY position"),
    )


def body(value) -> bytes:
    return json.dumps(value).encode()


# -- the edge ----------------------------------------------------------------------------------

EDGE_CASES = [
    ("/orders", DEEP, JSON, 400),
    ("/orders", b'{"customer_id": ' + DEEP + b"}", JSON, 400),
    ("/inventory/items", b'{"sku": ' + DEEP + b', "quantity": 1}', JSON, 400),
    ("/orders", b'{"customer_id": "c-\xff\xfe", "items": [{"sku": "widget", "quantity": 1}], "payment_method": "pm_card_ok"}', JSON, 400),
    ("/inventory/items", b'{"sku": "wid\xc3get", "quantity": 1}', JSON, 400),
    ("/orders", body(order()), {"content-type": "application/json; charset=latin-1"}, 400),
    ("/inventory/items", body({"sku": "widget", "quantity": 1}), {"content-type": "application/json; charset=latin-1"}, 400),
    ("/orders", body(order(items=[{"sku": "widget", "quantity": "5"}])), JSON, 400),
    ("/inventory/items", body({"sku": "widget", "quantity": "5"}), JSON, 400),
    ("/orders", body(order(customer_id=7)), JSON, 400),
    ("/orders", body(order()), {"content-type": "text/plain"}, 415),
    ("/inventory/items", body({"sku": "widget", "quantity": 1}), {"content-type": "text/plain"}, 415),
    ("/orders", body(order()), {"content-type": "application/x-www-form-urlencoded"}, 415),
]
EDGE_IDS = [
    "deep array", "deep field", "deep stock field", "invalid utf-8 order", "invalid utf-8 stock", "latin-1 order",
    "latin-1 stock", "string quantity order", "string quantity stock", "int customer", "text/plain order",
    "text/plain stock", "form order",
]


@pytest.mark.parametrize(("path", "content", "headers", "status"), EDGE_CASES, ids=EDGE_IDS)
async def test_a_hostile_body_at_the_edge_is_a_4xx_problem_and_changes_nothing(
    client, db, stocked, path, content, headers, status
):
    response = await client.post(path, content=content, headers=headers)

    assert_problem(response, status)
    assert await state(db) == stocked


async def test_a_json_body_with_a_utf8_charset_is_accepted(client):
    response = await client.post(
        "/inventory/items", content=body({"sku": "widget", "quantity": 1}),
        headers={"content-type": "application/json; charset=UTF-8"},
    )  # fmt: skip

    assert response.status_code == 201, response.text


async def test_an_unknown_docs_path_is_a_404_problem(client):
    response = await client.get("/schema/scalar")

    assert_problem(response, 404)


# -- the internal door -------------------------------------------------------------------------


def internal(name: str) -> str:
    return f"/internal/messages/{name}"


INTERNAL_CASES = [
    ("inventory.AddStock", {"sku": "widget", "quantity": -1000}, "InvalidStockRequest"),
    ("inventory.AddStock", {"sku": "widget", "quantity": 0}, "InvalidStockRequest"),
    ("inventory.AddStock", {"sku": "wid\x00get", "quantity": 1}, "InvalidStockRequest"),
    ("inventory.AddStock", {"sku": "", "quantity": 1}, "InvalidStockRequest"),
    ("inventory.AddStock", {"sku": "x" * 101, "quantity": 1}, "InvalidStockRequest"),
    ("inventory.GetStockLevel", {"sku": "wid\x00get"}, "InvalidStockRequest"),
    (
        "inventory.ReserveStock",
        {"order_id": "00000000-0000-4000-8000-000000000001", "lines": [{"sku": "widget", "quantity": -100}]},
        "InvalidStockRequest",
    ),
    ("inventory.ReserveStock", {"order_id": "00000000-0000-4000-8000-000000000001", "lines": []}, "InvalidStockRequest"),
    ("orders.PlaceOrder", {"customer_id": "c-1", "lines": [{"sku": "widget", "quantity": -100}], "payment_method": "pm_card_ok"}, "InvalidOrder"),
    ("orders.PlaceOrder", {"customer_id": "c-1", "lines": [], "payment_method": "pm_card_ok"}, "InvalidOrder"),
    ("orders.PlaceOrder", {"customer_id": "c\x00", "lines": [{"sku": "widget", "quantity": 1}], "payment_method": "pm_card_ok"}, "InvalidOrder"),
    ("orders.PlaceOrder", {"customer_id": "c-1", "lines": [{"sku": "w\x00", "quantity": 1}], "payment_method": "pm_card_ok"}, "InvalidOrder"),
    ("orders.PlaceOrder", {"customer_id": "c-1", "lines": [{"sku": "widget", "quantity": 1}], "payment_method": "p" * 201}, "InvalidOrder"),
    (
        "orders.PlaceOrder",
        {"customer_id": "c-1", "lines": [{"sku": "widget", "quantity": 1}], "payment_method": "pm_card_ok", "idempotency_key": ""},
        "InvalidOrder",
    ),
]
INTERNAL_IDS = [
    "negative stock", "zero stock", "nul sku", "empty sku", "long sku", "nul sku query", "negative reserve",
    "reserve no lines", "negative order line", "order no lines", "nul customer", "nul order sku", "long payment method",
    "empty idempotency key",
]


@pytest.mark.parametrize(("name", "message", "code"), INTERNAL_CASES, ids=INTERNAL_IDS)
async def test_a_message_breaking_a_rule_is_refused_at_the_internal_door_and_changes_nothing(
    client, db, stocked, name, message, code
):
    response = await client.post(internal(name), content=body(message), headers=INTERNAL)

    problem = assert_problem(response, 400)
    assert problem["code"] == code
    assert await state(db) == stocked


INTERNAL_BYTES = [
    ("inventory.AddStock", DEEP, INTERNAL, 400),
    ("inventory.AddStock", b'{"sku": ' + DEEP + b', "quantity": 1}', INTERNAL, 400),
    ("inventory.AddStock", b'{"sku": "wid\xffget", "quantity": 1}', INTERNAL, 400),
    ("inventory.AddStock", body({"sku": "widget", "quantity": "5"}), INTERNAL, 400),
    ("inventory.AddStock", body({"sku": "widget", "quantity": 1}), {**INTERNAL, "content-type": "application/json; charset=latin-1"}, 400),
    ("inventory.AddStock", body({"sku": "widget", "quantity": 1}), {**INTERNAL, "content-type": "text/plain"}, 415),
]
INTERNAL_BYTES_IDS = ["deep array", "deep field", "invalid utf-8", "string quantity", "latin-1", "text/plain"]


@pytest.mark.parametrize(("name", "content", "headers", "status"), INTERNAL_BYTES, ids=INTERNAL_BYTES_IDS)
async def test_hostile_bytes_at_the_internal_door_are_a_4xx_problem_and_change_nothing(
    client, db, stocked, name, content, headers, status
):
    response = await client.post(internal(name), content=content, headers=headers)

    assert_problem(response, status)
    assert await state(db) == stocked


async def test_a_valid_message_at_the_internal_door_still_runs(client, db):
    response = await client.post(internal("inventory.AddStock"), content=body({"sku": "widget", "quantity": 3}), headers=INTERNAL)

    assert response.status_code == 200, response.text
    assert await db.fetchval("SELECT count(*) FROM events") == 1


# -- both doors refuse the same orders ---------------------------------------------------------

texts = st.sampled_from(["fuzz-sku", "c-1", "", "\x00", "x" * 101, "x" * 201, "é✓"]) | st.text(max_size=8)
lines = st.lists(
    st.fixed_dictionaries(
        {"sku": st.just("fuzz-sku") | texts, "quantity": st.integers(-3, 3) | st.integers(-(2**40), 2**40)}
    ),
    max_size=3,
)


@pytest.fixture
def both_doors(settings, db):
    with TestClient(create_app(settings, run_relay=False)) as client:
        assert client.post("/inventory/items", json={"sku": "fuzz-sku", "quantity": 10**9}).status_code == 201
        yield client


def test_the_edge_and_the_internal_door_accept_and_refuse_the_same_orders(both_doors):
    @FUZZ
    @given(customer_id=texts, payment_method=texts, lines=lines)
    def check(customer_id, payment_method, lines):
        edge = both_doors.post(
            "/orders", json={"customer_id": customer_id, "items": lines, "payment_method": payment_method}
        )
        door = both_doors.post(
            internal("orders.PlaceOrder"),
            content=body({"customer_id": customer_id, "lines": lines, "payment_method": payment_method}),
            headers=INTERNAL,
        )
        assert edge.status_code < 500 and door.status_code < 500, (edge.text, door.text)
        assert (edge.status_code < 300) == (door.status_code < 300), (edge.text, door.text)
        if edge.status_code >= 300:
            assert edge.status_code == door.status_code, (edge.text, door.text)
            assert door.headers["content-type"].startswith("application/problem+json")

    check()
