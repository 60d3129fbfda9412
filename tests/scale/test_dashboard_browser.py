"""The dashboard in a real browser (Debian's chromium driven by playwright) against a real
`switchboard serve`: log in, watch a dead letter arrive live, replay it, follow its correlation id.

Set SWITCHBOARD_SCREENSHOT=docs/dashboard.png to refresh the README's screenshot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.scale.conftest import ADMIN_TOKEN, call, order_body

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT_MS = 20_000  # a condition on the page; the live panel polls every 2 s


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's package `chromium` (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


async def test_an_operator_replays_a_dead_letter_and_follows_its_correlation_id(cluster, chromium, tmp_path):
    from playwright.async_api import async_playwright, expect

    server = await cluster.start("dashboard", env={"SWITCHBOARD_RETRY_CAP": "0.05"})
    status, _, _ = await call(cluster.http, "POST", f"{server.url}/inventory/items",
                              json_body={"sku": "lamp", "quantity": 5})
    assert status == 201

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium), args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(f"{server.url}/dashboard")
            await page.fill("#name", "alice")
            await page.fill("#token", ADMIN_TOKEN)
            await page.click("button:text('Log in')")
            await expect(page.get_by_role("heading", name="Subscribers")).to_be_visible(timeout=WAIT_MS)

            status, _, placed = await call(
                cluster.http, "POST", f"{server.url}/orders",
                json_body=order_body("lamp", 1, "pm_card_broken"), headers={"X-Request-ID": "browser-trace-1"},
            )
            assert status == 201, placed

            # no reload: the live panel brings the letter in
            letter = page.locator("#live a[href^='/dashboard/dead-letters/']").first
            await expect(letter).to_be_visible(timeout=WAIT_MS)
            await expect(page.locator("#live")).to_contain_text("payments.charge_order")
            await expect(page.locator("#live")).to_contain_text("CardProcessingError")
            await page.screenshot(path=os.environ.get("SWITCHBOARD_SCREENSHOT") or tmp_path / "dashboard.png",
                                  full_page=True)

            await letter.click()
            await expect(page.get_by_role("heading", name="History")).to_be_visible(timeout=WAIT_MS)
            await expect(page.locator("main")).to_contain_text(placed["order_id"])  # the payload
            await page.click("button:text('Replay')")
            history = page.locator("h2", has_text="History").locator("xpath=following-sibling::table[1]")
            await expect(history.locator("tr", has_text="dashboard:alice")).to_contain_text("replayed", timeout=WAIT_MS)

            await page.fill("input[name=correlation_id]", "browser-trace-1")
            await page.click("button:text('Search')")
            main = page.locator("main")
            await expect(main).to_contain_text("orders.OrderPlaced", timeout=WAIT_MS)
            events = page.locator("h2", has_text="Events").locator("xpath=following-sibling::table[1]")
            await expect(events).to_contain_text(f"order-{placed['order_id']}")
            deliveries = page.locator("h2", has_text="Deliveries").locator("xpath=following-sibling::table[1]")
            await expect(deliveries.locator("tr", has_text="payments.charge_order")).not_to_have_count(0)
            await expect(deliveries).to_contain_text("delivered")
            letters = page.locator("h2", has_text="Dead letters").locator("xpath=following-sibling::table[1]")
            await expect(letters).to_contain_text("dashboard:alice")
        finally:
            await browser.close()
