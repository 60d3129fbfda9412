"""The HTTP edge refuses bad input with an RFC 9457 problem (4xx), never a 500."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from urllib.parse import quote

import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st
from litestar.testing import TestClient

from app.main import create_app

PROBLEM = "application/problem+json"
UNKNOWN_ORDER = "/orders/00000000-0000-4000-8000-000000000000"


def assert_problem(response, status: int) -> dict:
    """The response is a problem document (RFC 9457) with this status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body = response.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body.get("detail", ""), str)
    return body


def order(**overrides) -> dict:
    body = {"customer_id": "c-1", "items": [{"sku": "widget", "quantity": 1}], "payment_method": "pm_card_ok"}
    body.update(overrides)
    return body


# -- bodies ------------------------------------------------------------------------------------


async def test_malformed_json_is_a_400_problem(client):
    response = await client.post(
        "/orders", content=b'{"customer_id": ', headers={"content-type": "application/json"}
    )

    assert_problem(response, 400)


async def test_a_field_of_the_wrong_type_is_a_400_problem(client):
    response = await client.post("/orders", json=order(customer_id=42))

    body = assert_problem(response, 400)
    assert body["errors"][0]["key"] == "customer_id"


async def test_a_missing_field_is_a_400_problem(client):
    body = order()
    del body["payment_method"]

    response = await client.post("/orders", json=body)

    assert_problem(response, 400)


async def test_an_unknown_field_is_a_400_problem(client):
    response = await client.post("/orders", json=order(coupon="FREE"))

    body = assert_problem(response, 400)
    assert "coupon" in body["errors"][0]["message"]


@pytest.mark.parametrize("quantity", [0, -1])
async def test_an_order_line_quantity_below_one_is_a_400_problem(client, quantity):
    response = await client.post("/orders", json=order(items=[{"sku": "widget", "quantity": quantity}]))

    body = assert_problem(response, 400)
    assert body["errors"][0]["key"] == "items[0].quantity"


@pytest.mark.parametrize("quantity", [0, -5])
async def test_adding_stock_below_one_unit_is_a_400_problem(client, quantity):
    response = await client.post("/inventory/items", json={"sku": "widget", "quantity": quantity})

    assert_problem(response, 400)


async def test_an_order_without_items_is_a_400_problem(client):
    response = await client.post("/orders", json=order(items=[]))

    body = assert_problem(response, 400)
    assert body["errors"][0]["key"] == "items"


async def test_a_body_over_one_megabyte_is_a_413_problem(client):
    body = json.dumps(order(customer_id="x" * 1_100_000)).encode()

    response = await client.post("/orders", content=body, headers={"content-type": "application/json"})

    assert_problem(response, 413)


def test_a_chunked_body_over_one_megabyte_is_a_413_problem(sync_client):
    chunks = (b" " * 100_000 for _ in range(12))  # no Content-Length: the limit holds while streaming

    response = sync_client.post("/orders", content=chunks, headers={"content-type": "application/json"})

    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert_problem(response, 413)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/orders", order(customer_id="c\x00")),
        ("/orders", order(items=[{"sku": "wid\x00get", "quantity": 1}])),
        ("/inventory/items", {"sku": "wid\x00get", "quantity": 1}),
    ],
    ids=["customer_id", "order sku", "stock sku"],
)
async def test_a_nul_character_in_a_text_field_is_a_400_problem(client, path, body):
    # PostgreSQL text cannot store NUL; it must be refused at the edge, not fail in the database.
    assert (await client.post("/inventory/items", json={"sku": "widget", "quantity": 5})).status_code == 201

    response = await client.post(path, json=body)

    assert_problem(response, 400)


# -- routes and parameters -----------------------------------------------------------------------


async def test_an_unknown_route_is_a_404_problem(client):
    response = await client.get("/no/such/route")

    assert_problem(response, 404)


async def test_a_wrong_method_is_a_405_problem(client):
    response = await client.delete("/orders")

    assert_problem(response, 405)


async def test_an_order_id_that_is_not_a_uuid_is_a_404_problem(client):
    response = await client.get("/orders/not-a-uuid")

    assert_problem(response, 404)


async def test_ordering_a_sku_that_was_never_stocked_is_a_422_problem(client):
    response = await client.post("/orders", json=order(items=[{"sku": "never-stocked", "quantity": 1}]))

    body = assert_problem(response, 422)
    assert "never-stocked" in body["detail"]


async def test_an_unknown_order_is_a_404_problem(client):
    response = await client.get(UNKNOWN_ORDER)

    assert_problem(response, 404)


async def test_an_unknown_sku_is_a_404_problem(client):
    response = await client.get("/inventory/items/never-stocked")

    assert_problem(response, 404)


async def test_a_nul_character_in_a_sku_path_is_a_400_problem(client):
    response = await client.get("/inventory/items/wid%00get")

    assert_problem(response, 400)


@pytest.mark.parametrize("after", ["-1", "abc", str(2**63)])
async def test_an_after_position_that_is_no_bigint_is_a_400_problem(client, after):
    response = await client.get(UNKNOWN_ORDER, params={"after": after})

    assert_problem(response, 400)


async def test_a_position_header_beyond_bigint_is_a_400_problem(client):
    response = await client.get(UNKNOWN_ORDER, headers={"X-Switchboard-Position": str(2**64)})

    assert_problem(response, 400)


async def test_listing_notifications_without_an_order_id_is_a_400_problem(client):
    response = await client.get("/notifications")

    assert_problem(response, 400)


# -- request ids -------------------------------------------------------------------------------


async def test_a_given_request_id_is_echoed_back(client):
    response = await client.get(UNKNOWN_ORDER, headers={"X-Request-ID": "req-42.a:b"})

    assert response.headers["x-request-id"] == "req-42.a:b"


async def test_a_request_id_is_generated_when_absent(client):
    first = await client.get("/health/live")
    second = await client.get("/health/live")

    assert re.fullmatch(r"[0-9a-f]{32}", first.headers["x-request-id"])
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_an_unsafe_request_id_is_replaced_by_a_generated_one(client):
    response = await client.get("/health/live", headers={"X-Request-ID": "evil id\twith spaces"})

    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


async def test_a_request_id_is_echoed_on_a_404_that_matched_no_route(client):
    response = await client.get("/no/such/route", headers={"X-Request-ID": "lost-1"})

    assert response.headers["x-request-id"] == "lost-1"


async def test_a_500_problem_names_the_request_id_and_hides_the_error(client, monkeypatch):
    async def broken(query):
        raise RuntimeError("boom: secret internals")

    monkeypatch.setattr(client.app.state.system.mediator, "ask", broken)

    response = await client.get("/inventory/items/widget", headers={"X-Request-ID": "trace-500"})

    body = assert_problem(response, 500)
    assert body["request_id"] == "trace-500"
    assert "secret internals" not in response.text  # the error stays in the log


# -- fuzz --------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Well-typed bodies with arbitrary text: values known to be interesting at this edge (the stocked
# SKU, length limits, NUL, which PostgreSQL text cannot hold, non-ASCII), then any text at all.
texts = st.sampled_from(["fuzz-sku", "pm_card_ok", "", "\x00", "fuzz-sku\x00", "x" * 201, "é✓😀"]) | st.text()
skus = st.just("fuzz-sku") | texts
quantities = st.integers(min_value=1, max_value=3) | st.integers(min_value=-(2**70), max_value=2**70)
order_bodies = st.fixed_dictionaries(
    {
        "customer_id": texts,
        "items": st.lists(
            st.fixed_dictionaries({"sku": skus, "quantity": quantities}), min_size=1, max_size=3
        ),
        "payment_method": texts,
    }
)
stock_bodies = st.fixed_dictionaries({"sku": texts, "quantity": quantities})
FUZZ = hypothesis.settings(
    max_examples=100,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the repository
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)


@pytest.fixture
def sync_client(settings, db):
    """litestar's synchronous TestClient over the same app, so hypothesis can drive it."""
    with TestClient(
        create_app(replace(settings, admin_token="secret-admin-token"), run_relay=False)
    ) as client:
        assert client.post("/inventory/items", json={"sku": "fuzz-sku", "quantity": 10**6}).status_code == 201
        yield client


def _post_never_500(client: TestClient, path: str, content: bytes) -> None:
    response = client.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code < 500, (path, content[:300], response.text[:300])
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith(PROBLEM)


@pytest.mark.parametrize("path", ["/orders", "/inventory/items"])
def test_arbitrary_json_bodies_never_cause_a_server_error(sync_client, path):
    @FUZZ
    @given(body=json_values)
    def check(body):
        _post_never_500(sync_client, path, json.dumps(body).encode())

    check()


@pytest.mark.parametrize("path", ["/orders", "/inventory/items"])
def test_arbitrary_bytes_never_cause_a_server_error(sync_client, path):
    @FUZZ
    @given(body=st.binary(max_size=200))
    def check(body):
        _post_never_500(sync_client, path, body)

    check()


def test_well_typed_orders_with_arbitrary_values_never_cause_a_server_error(sync_client):
    @FUZZ
    @given(body=order_bodies)
    def check(body):
        _post_never_500(sync_client, "/orders", json.dumps(body).encode())

    check()


def test_well_typed_stock_additions_with_arbitrary_values_never_cause_a_server_error(sync_client):
    @FUZZ
    @given(body=stock_bodies)
    def check(body):
        _post_never_500(sync_client, "/inventory/items", json.dumps(body).encode())

    check()


def test_a_fuzzed_order_id_path_never_causes_a_server_error(sync_client):
    @FUZZ
    @given(order_id=st.uuids() | st.text(max_size=40), after=st.none() | st.integers() | st.text(max_size=10))
    def check(order_id, after):
        params = {} if after is None else {"after": str(after)}
        response = sync_client.get(f"/orders/{quote(str(order_id), safe='')}", params=params)
        assert response.status_code < 500, (order_id, after, response.text[:300])

    check()
