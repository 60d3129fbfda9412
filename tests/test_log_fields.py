"""Log lines (issue 13) in one process: with tracing on, each line of a request or delivery names
its trace and span; a retry is a warning and a dead letter an error, each with the row's fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import replace

import pytest

from app import logs, observe
from tests.test_compensation_flow import failed_order
from tests.test_tracing import ORDER, Tree, spans  # noqa: F401  (the spans fixture)


@pytest.fixture
def lines(settings) -> Iterator[io.StringIO]:
    """JSON lines at debug into a buffer; the process's logging as it was afterwards."""
    root = logging.getLogger()
    level, before = root.level, logs._handler
    out = io.StringIO()
    logs.setup_logging(replace(settings, log_level="debug", log_format="json"), stream=out)
    try:
        yield out
    finally:
        root.removeHandler(logs._handler)
        logs._handler = before
        if before is not None:
            root.addHandler(before)
        root.setLevel(level)
        observe.DEBUG = False


def parsed(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_with_tracing_on_each_line_names_the_span_it_was_written_in(client, app_relay, spans, lines):  # noqa: F811
    await client.post("/inventory/items", json={"sku": "widget", "quantity": 5})
    await client.post("/orders", json=ORDER, headers={"X-Request-ID": "traced-lines"})
    await app_relay.drain()

    tree = Tree(spans.get_finished_spans())
    by_span = {format(s.context.span_id, "016x"): s for s in tree.spans}
    mine = [line for line in parsed(lines) if line.get("correlation_id") == "traced-lines"]
    trace_id = format(tree.one("POST /orders").context.trace_id, "032x")
    assert mine and {line["trace_id"] for line in mine} == {trace_id}
    for line in mine:
        span = by_span[line["span_id"]]
        if line["event"] == "delivery ok":
            assert span.name == line["subscriber"]  # written in its delivery's span
        elif line["logger"] == "app.mediator":
            assert span.name == line["message"]  # written in the call's span
    assert {line["subscriber"] for line in mine if line["event"] == "delivery ok"} == {
        "payments.charge_order", "orders.mark_order_paid", "notifications.notify_customer",
        "inventory.commit_reservation",
    }  # fmt: skip  (orders_view is projected inline: no delivery)


async def test_retries_log_at_warning_and_dead_letters_at_error_with_the_rows_fields(client, app_relay, db, lines):
    placed = await failed_order(client, app_relay, db)

    correlation = await db.fetchval(
        "SELECT metadata->>'correlation_id' FROM events WHERE stream_id = $1", f"order-{placed['order_id']}"
    )
    charges = [line for line in parsed(lines) if line.get("subscriber") == "payments.charge_order"]
    retries = [line for line in charges if line["event"].startswith("retrying")]
    [dead] = [line for line in charges if line["event"].startswith("dead-lettered")]
    assert [line["level"] for line in retries] == ["warning"] * 4  # max_attempts 5: four retries
    assert [line["attempt"] for line in retries] == [1, 2, 3, 4]
    assert (dead["level"], dead["attempt"]) == ("error", 5)
    for line in [*retries, dead]:
        assert line["correlation_id"] == correlation, line
        assert (line["module"], line["message"]) == ("payments", "orders.OrderPlaced"), line
        assert isinstance(line["outbox_id"], int) and line["causation_id"] and line["error"], line
    assert dead["outbox_id"] == retries[0]["outbox_id"] and isinstance(dead["dead_letter"], int)


def test_console_lines_show_a_plain_traceback_without_the_frames_locals(settings):
    out = io.StringIO()
    root = logging.getLogger()
    level, before = root.level, logs._handler
    logs.setup_logging(replace(settings, log_format="console"), stream=out)
    try:
        token = "s3cret-token-value"  # noqa: F841  (a local a rich traceback would print)
        try:
            raise RuntimeError("broke")
        except RuntimeError:
            logging.getLogger("app.http").exception("request failed")
    finally:
        root.removeHandler(logs._handler)
        logs._handler = before
        if before is not None:
            root.addHandler(before)
        root.setLevel(level)
    text = out.getvalue()
    assert "request failed" in text and "RuntimeError: broke" in text and "Traceback" in text
    assert "s3cret-token-value" not in text and "\x1b[" not in text  # no locals, no colours off a terminal
