"""The operator dashboard over plain HTTP: who may see it, CSRF on its buttons, escaping, search."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import replace

import httpx
import pytest

from app.main import create_app
from modules.inventory.commands import AddStock
from modules.orders.commands import OrderLine, PlaceOrder

TOKEN = "secret-admin-token"  # what the `client` fixture configures
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PROBLEM = "application/problem+json"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


async def paid_order(client, correlation_id: str) -> None:
    await client.post("/inventory/items", json={"sku": "widget", "quantity": 5})
    body = {"customer_id": "c-1", "items": [{"sku": "widget", "quantity": 1}], "payment_method": "pm_card_ok"}
    placed = await client.post("/orders", json=body, headers={"X-Request-ID": correlation_id})
    assert placed.status_code == 201, placed.text


async def dead_letter(client, relay) -> int:
    """A parked dead letter: a broken card's charge, after all its attempts."""
    system = client.app.state.system
    await system.mediator.send(AddStock(sku="widget", quantity=5))
    await system.mediator.send(
        PlaceOrder(customer_id="c-1", lines=(OrderLine(sku="widget", quantity=1),), payment_method="pm_card_broken")
    )
    db = system.db
    async with asyncio.timeout(10):
        while not await db.fetchval("SELECT count(*) FROM dead_letters"):
            await relay.drain()
    return await db.fetchval("SELECT id FROM dead_letters")


async def log_in(client, name: str = "alice") -> str:
    """Log in through the form; returns the session's CSRF token (read from the page)."""
    response = await client.post("/dashboard/login", data={"name": name, "token": TOKEN})
    assert response.status_code == 303, response.text
    page = await client.get("/dashboard")
    assert page.status_code == 200
    return CSRF.search(page.text).group(1)


def assert_login_form(response) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert 'action="/dashboard/login"' in response.text


async def test_without_an_admin_token_the_dashboard_is_absent_and_the_start_says_how_to_turn_it_on(
    settings, caplog
):
    with caplog.at_level(logging.WARNING, logger="app.main"):
        app = create_app(replace(settings, admin_token=None), run_relay=False)
    lines = [r.getMessage() for r in caplog.records if "dashboard" in r.getMessage()]
    assert len(lines) == 1 and "SWITCHBOARD_ADMIN_TOKEN" in lines[0]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as http:
        for path in ("/dashboard", "/dashboard/panel", "/dashboard/static/htmx.min.js"):
            response = await http.get(path, headers=BEARER)
            assert response.status_code == 404, path
            assert response.headers["content-type"].startswith(PROBLEM)


async def test_without_credentials_the_dashboard_shows_the_login_form_and_no_data(client, app_relay):
    await dead_letter(client, app_relay)

    response = await client.get("/dashboard")

    assert_login_form(response)
    for data in ("payments.charge_order", "pm_card_broken", "widget", "Dead letter"):
        assert data not in response.text


@pytest.mark.parametrize("path", ["/dashboard/search?correlation_id=abc", "/dashboard/dead-letters/1"])
async def test_every_page_without_credentials_is_the_login_form(client, app_relay, path):
    await dead_letter(client, app_relay)

    response = await client.get(path)

    assert_login_form(response)
    assert "payments.charge_order" not in response.text


async def test_the_live_panel_without_credentials_is_a_401_problem_or_an_htmx_redirect(client):
    plain = await client.get("/dashboard/panel")
    assert plain.status_code == 401 and plain.headers["content-type"].startswith(PROBLEM)

    from_htmx = await client.get("/dashboard/panel", headers={"HX-Request": "true"})
    assert from_htmx.headers["HX-Redirect"] == "/dashboard" and from_htmx.text == ""


async def test_a_bearer_token_opens_the_dashboard(client, app_relay):
    letter = await dead_letter(client, app_relay)

    response = await client.get("/dashboard", headers=BEARER)

    assert response.status_code == 200
    assert "payments.charge_order" in response.text and f"/dashboard/dead-letters/{letter}" in response.text
    assert 'hx-trigger="every 2s"' in response.text


async def test_a_wrong_bearer_token_is_a_401_problem(client):
    response = await client.get("/dashboard", headers={"Authorization": "Bearer not-the-token"})

    assert response.status_code == 401 and response.headers["content-type"].startswith(PROBLEM)
    assert "payments" not in response.text


async def test_a_wrong_token_on_the_login_form_shows_the_form_again_with_no_session(client):
    response = await client.post("/dashboard/login", data={"name": "mallory", "token": "guess"})

    assert response.status_code == 401
    assert 'action="/dashboard/login"' in response.text and "Wrong admin token" in response.text
    assert "set-cookie" not in response.headers
    assert_login_form(await client.get("/dashboard"))


async def test_logging_in_sets_an_httponly_strict_cookie_that_does_not_hold_the_token(client):
    response = await client.post("/dashboard/login", data={"name": "alice", "token": TOKEN})

    assert response.status_code == 303 and response.headers["location"] == "/dashboard"
    cookie = response.headers["set-cookie"]
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert "httponly" in attributes and "samesite=strict" in attributes
    assert TOKEN not in cookie
    page = await client.get("/dashboard")
    assert "payments.charge_order" in page.text and "alice" in page.text


async def test_a_forged_session_cookie_is_no_session(client):
    await log_in(client)
    name, issued, sid, _ = client.cookies["switchboard_dashboard"].split(":")
    client.cookies.clear()
    client.cookies.set("switchboard_dashboard", ":".join((name, issued, sid, "0" * 64)), path="/dashboard")

    assert_login_form(await client.get("/dashboard"))


async def test_replaying_without_the_csrf_token_is_refused(client, app_relay):
    letter = await dead_letter(client, app_relay)
    await log_in(client)

    missing = await client.post(f"/dashboard/dead-letters/{letter}/replay", data={})
    wrong = await client.post(f"/dashboard/dead-letters/{letter}/replay", data={"csrf_token": "0" * 64})

    for response in (missing, wrong):
        assert response.status_code == 403 and response.headers["content-type"].startswith(PROBLEM)
    status = await client.app.state.system.db.fetchval("SELECT status FROM dead_letters WHERE id = $1", letter)
    assert status == "parked"


async def test_replay_with_the_csrf_token_replays_and_records_the_operator(client, app_relay):
    letter = await dead_letter(client, app_relay)
    csrf = await log_in(client, "alice")

    response = await client.post(f"/dashboard/dead-letters/{letter}/replay", data={"csrf_token": csrf})

    assert response.status_code == 303 and response.headers["location"] == f"/dashboard/dead-letters/{letter}"
    page = await client.get(response.headers["location"])
    assert "replayed" in page.text and "dashboard:alice" in page.text
    db = client.app.state.system.db
    assert await db.fetchval("SELECT resolved_by FROM dead_letters WHERE id = $1", letter) == "dashboard:alice"


async def test_discard_with_the_csrf_token_discards(client, app_relay):
    letter = await dead_letter(client, app_relay)
    csrf = await log_in(client, "bob")

    await client.post(f"/dashboard/dead-letters/{letter}/discard", data={"csrf_token": csrf})

    db = client.app.state.system.db
    row = await db.fetchrow("SELECT status, resolved_by FROM dead_letters WHERE id = $1", letter)
    assert tuple(row) == ("discarded", "dashboard:bob")


async def test_a_bearer_client_replays_without_a_csrf_token(client, app_relay):
    letter = await dead_letter(client, app_relay)

    response = await client.post(f"/dashboard/dead-letters/{letter}/replay", headers=BEARER)

    assert response.status_code == 303
    actor = await client.app.state.system.db.fetchval("SELECT resolved_by FROM dead_letters WHERE id = $1", letter)
    assert actor.startswith("dashboard:bearer@")


async def test_a_dead_letter_is_shown_with_its_error_traceback_payload_and_history(client, app_relay):
    letter = await dead_letter(client, app_relay)

    page = (await client.get(f"/dashboard/dead-letters/{letter}", headers=BEARER)).text

    assert "payments.charge_order" in page and "Traceback" in page
    assert "pm_card_broken" in page  # the payload
    assert "parked" in page and "relay:" in page  # the history row
    assert ">Replay<" in page and ">Discard for good<" in page


async def test_values_from_the_database_are_escaped(client, app_relay):
    letter = await dead_letter(client, app_relay)
    db = client.app.state.system.db
    await db.execute(
        "UPDATE dead_letters SET error_message = $2, error_type = $3, partition_key = $4 WHERE id = $1",
        letter, "<script>alert('message')</script>", "<img src=x onerror=alert(1)>", '"><script>key</script>',
    )

    for path in ("/dashboard", "/dashboard/panel", f"/dashboard/dead-letters/{letter}"):
        page = (await client.get(path, headers=BEARER)).text
        assert "<script>alert" not in page and "<img src=x" not in page and "<script>key" not in page, path
        assert "&lt;script&gt;alert(&#x27;message&#x27;)&lt;/script&gt;" in page, path


@pytest.mark.outbox_retention(3600)  # the delivered rows are what it shows
async def test_searching_a_correlation_id_shows_its_events_and_deliveries_in_order(client, app_relay):
    await client.post("/inventory/items", json={"sku": "widget", "quantity": 5})
    body = {"customer_id": "c-1", "items": [{"sku": "widget", "quantity": 1}], "payment_method": "pm_card_ok"}
    placed = await client.post("/orders", json=body, headers={"X-Request-ID": "trace-42"})
    assert placed.status_code == 201, placed.text
    await app_relay.drain()  # one order per relay run: see test_correlation_in_fast_runs.py
    await client.post("/orders", json=body, headers={"X-Request-ID": "someone-else"})
    await app_relay.drain()

    page = (await client.get("/dashboard/search?correlation_id=trace-42", headers=BEARER)).text

    assert "orders.OrderPlaced" in page and "payments.PaymentCaptured" in page
    assert "payments.charge_order" in page and "delivered" in page
    assert page.index("orders.OrderPlaced") < page.index("payments.PaymentCaptured")
    db = client.app.state.system.db
    shown = int(re.search(r"<h2>Events \((\d+)\)", page).group(1))
    assert shown == await db.fetchval("SELECT count(*) FROM events WHERE metadata->>'correlation_id' = 'trace-42'")
    others = await db.fetch("SELECT stream_id FROM events WHERE metadata->>'correlation_id' = 'someone-else'")
    assert all(r["stream_id"] not in page for r in others if r["stream_id"].startswith("order-"))


async def test_a_malformed_correlation_id_is_refused_with_one_line(client):
    response = await client.get("/dashboard/search", params={"correlation_id": "<x>"}, headers=BEARER)

    assert response.status_code == 200
    assert "A correlation id is" in response.text and "<x>" not in response.text


async def test_the_dashboard_loads_nothing_from_another_host(client, app_relay):
    await dead_letter(client, app_relay)

    page = await client.get("/dashboard", headers=BEARER)

    references = re.findall(r'(?:src|href|action|hx-get)="([^"]*)"', page.text)
    assert references and all(ref.startswith("/dashboard") for ref in references), references
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = await client.get("/dashboard/static/htmx.min.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert script.content.startswith(b"var htmx=")


def subscriber_headers(page: str) -> list[str]:
    table = page[page.index("<h2>Subscribers</h2>"):]
    return re.findall(r"<th>([^<]*)</th>", table[: table.index("</thead>")])


async def test_without_outbox_retention_the_panel_has_no_delivered_count_and_names_the_metric(client, app_relay):
    await paid_order(client, "rate-0")
    await app_relay.drain()

    page = (await client.get("/dashboard/panel", headers=BEARER)).text

    assert "payments.charge_order" in page
    assert "delivered / min" not in subscriber_headers(page) and "lag" in subscriber_headers(page)
    assert "switchboard_relay_delivered_total" in page and "SWITCHBOARD_OUTBOX_RETENTION=0" in page


@pytest.mark.outbox_retention(3600)
async def test_with_outbox_retention_the_panel_counts_the_deliveries_of_the_last_minute(client, app_relay):
    await paid_order(client, "rate-kept")
    await app_relay.drain()

    page = (await client.get("/dashboard/panel", headers=BEARER)).text

    assert subscriber_headers(page)[-1] == "delivered / min"
    row = re.search(r"<tr><td>payments\.charge_order</td>(.*?)</tr>", page).group(1)
    assert re.findall(r'<td class="n[^"]*">([^<]*)</td>', row)[-1] == "1"
    assert "switchboard_relay_delivered_total" not in page


async def test_without_outbox_retention_the_search_lists_the_deliveries_still_to_make(client, app_relay):
    await paid_order(client, "trace-0")

    waiting = (await client.get("/dashboard/search?correlation_id=trace-0", headers=BEARER)).text
    await app_relay.drain()
    done = (await client.get("/dashboard/search?correlation_id=trace-0", headers=BEARER)).text

    assert "payments.charge_order" in waiting and ">pending<" in waiting  # the charge is still to make
    assert "payments.PaymentCaptured" in done and "<h2>Deliveries (0)</h2>" in done
    assert "No delivery waiting or failing." in done and "deleted when it is delivered" in done
