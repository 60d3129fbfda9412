"""The dashboard's views: the live overview panel, one dead letter, one correlation id."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from app.dashboard.html import action_form, age, e, search_form, table, when

POLL = 'hx-get="/dashboard/panel" hx-trigger="every 2s" hx-swap="innerHTML"'


def overview_page(data: dict[str, Any], csrf: str | None) -> str:
    return f'<div id="live" {POLL}>{overview_panel(data, csrf)}</div>'


def overview_panel(data: dict[str, Any], csrf: str | None) -> str:
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    return (
        f'<p class="muted">Live, refreshed every 2 s; last at {e(stamp)} UTC, from instance '
        f"{e(data['instance'])}.</p>"
        f'<div class="grid"><section><h2>Instances</h2>{_services(data["services"])}</section>'
        f'<section><h2>Circuit breakers (this instance)</h2>{_breakers(data["breakers"])}</section></div>'
        f'<h2>Subscribers</h2>{_subscribers(data["subscribers"], data["delivered_kept"])}'
        f'<h2 id="dead-letters">Dead letters ({e(data["dead_letters_parked"])} parked)</h2>'
        f'{_letters(data["dead_letters"], csrf)}'
        f'<h2>Parked keys</h2>{_parked(data["parked_keys"])}'
    )


def _services(services: list[dict]) -> str:
    rows = [
        f'<tr><td>{e(s["instance_id"])}</td><td>{e(", ".join(s["modules"]))}</td><td>{e(s["base_url"])}</td>'
        f'<td class="n {"ok" if s["live"] else "bad"}">{e(age(s["heartbeat_age_seconds"]))}'
        f'{"" if s["live"] else " (stale)"}</td></tr>'
        for s in services
    ]
    return table(["instance", "modules", "endpoint", "heartbeat age"], rows, "No instance registered.")


def _breakers(breakers: list[dict]) -> str:
    rows = [
        f'<tr><td>{e(b["module"])}</td><td class="{"ok" if b["state"] == "closed" else "bad"}">{e(b["state"])}</td>'
        f'<td class="n">{e(b["failures"])} / {e(b["fail_max"])}</td></tr>'
        for b in breakers
    ]
    return table(["module", "state", "failures"], rows, "No breakers.")


# With no outbox retention a row is deleted when delivered: nothing in the table to count.
RATE_ELSEWHERE = (
    '<p class="muted">Delivered rows are deleted on delivery (<code>SWITCHBOARD_OUTBOX_RETENTION=0</code>): '
    "the delivery rate is <code>switchboard_relay_delivered_total</code> on each instance's <code>/metrics</code>.</p>"
)


def _subscribers(subscribers: list[dict], delivered_kept: bool) -> str:
    rows = []
    for s in subscribers:
        lag_class = "warn" if (s["lag_seconds"] or 0) > 5 else ""
        rows.append(
            f'<tr><td>{e(s["subscriber"])}</td><td class="n">{e(s["pending"])}</td>'
            f'<td class="n">{e(s["inflight"])}</td><td class="n">{e(s["blocked"])}</td>'
            f'<td class="n {"bad" if s["dead"] else ""}">{e(s["dead"])}</td>'
            f'<td class="n">{e(age(s["oldest_age_seconds"]))}</td>'
            f'<td class="n {lag_class}">{e(age(s["lag_seconds"]))}</td>'
            + (f'<td class="n">{e(s["per_minute"])}</td>' if delivered_kept else "")
            + "</tr>"
        )
    headers = ["subscriber", "pending", "in flight", "blocked", "dead", "oldest", "lag"]
    if delivered_kept:
        return table([*headers, "delivered / min"], rows, "No subscribers.")
    return table(headers, rows, "No subscribers.") + RATE_ELSEWHERE


def _letters(letters: list[dict], csrf: str | None) -> str:
    rows = [
        f'<tr><td><a href="/dashboard/dead-letters/{e(d["id"])}">#{e(d["id"])}</a></td><td>{e(d["subscriber"])}</td>'
        f'<td>{e(d["type"])}</td><td>{e(d["partition_key"])}</td><td class="n">{e(d["attempts"])}</td>'
        f'<td><b>{e(d["error_type"])}</b>: {e(_clip(d["error_message"]))}</td><td>{when(d["last_failed_at"])}</td>'
        f"<td>{action_form(_replay_url(d), 'Replay', csrf)}</td></tr>"
        for d in letters
    ]
    headers = ["letter", "subscriber", "event", "key", "attempts", "error", "last failure", ""]
    return table(headers, rows, "No parked dead letters.")


def _replay_url(letter: dict) -> str:
    return f"/dashboard/dead-letters/{letter['id']}/replay"


def _parked(parked: list[dict]) -> str:
    rows = [
        f'<tr><td>{e(p["subscriber"])}</td><td>{e(p["partition_key"])}</td>'
        f'<td><a href="/dashboard/dead-letters/{e(p["dead_letter_id"])}">#{e(p["dead_letter_id"])}</a></td>'
        f'<td class="n">{e(p["waiting"])}</td></tr>'
        for p in parked
    ]
    return table(["subscriber", "key", "parked behind", "rows waiting"], rows, "No parked keys.")


def _clip(text: str | None, limit: int = 160) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit] + "…"


def _json(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def letter_page(letter: dict[str, Any], csrf: str | None) -> str:
    actions = ""
    if letter["status"] == "parked":
        base = f"/dashboard/dead-letters/{letter['id']}"
        actions = (
            f'<p>{action_form(base + "/replay", "Replay", csrf)} '
            f"<details style=\"display:inline-block\"><summary>Discard…</summary>"
            f'{action_form(base + "/discard", "Discard for good", csrf)}</details></p>'
        )
    facts = [
        ("status", letter["status"]), ("subscriber", letter["subscriber"]), ("event", letter["type"]),
        ("key", letter["partition_key"]), ("message id", letter["message_id"]), ("position", letter["position"]),
        ("attempts", letter["attempts"]), ("first failure", letter["first_failed_at"]),
        ("last failure", letter["last_failed_at"]), ("resolved by", letter["resolved_by"]),
    ]
    rows = "".join(
        f"<tr><th>{e(k)}</th><td>{when(v) if isinstance(v, datetime) else e(v)}</td></tr>" for k, v in facts
    )
    history = [
        f'<tr><td>{when(h["at"])}</td><td>{e(h["action"])}</td><td>{e(h["actor"])}</td></tr>'
        for h in letter["history"]
    ]
    correlation = _json(letter["headers"])
    return (
        f'<h2>Dead letter #{e(letter["id"])}</h2>{actions}<table><tbody>{rows}</tbody></table>'
        f'<h2>Error</h2><p><b>{e(letter["error_type"])}</b>: {e(letter["error_message"])}</p>'
        f'<pre>{e(letter["error_traceback"])}</pre>'
        f'<h2>Payload</h2><pre>{e(_json(letter["payload"]))}</pre>'
        f"<h2>Headers</h2><pre>{e(correlation)}</pre>"
        f'<h2>History</h2>{table(["at", "action", "by"], history, "No history.")}'
    )


DELIVERED_GONE = (
    '<p class="muted">Only deliveries still to make are listed: with <code>SWITCHBOARD_OUTBOX_RETENTION=0</code> '
    "a row is deleted when it is delivered, so a subscriber of these events with no row here has had its delivery.</p>"
)


def search_page(correlation_id: str, found: dict[str, Any] | None, problem: str | None = None) -> str:
    head = f"<h2>Correlation id</h2><p>{search_form(correlation_id)}</p>"
    if problem:
        return head + f'<p class="error">{e(problem)}</p>'
    if found is None:
        return head
    events = [
        f'<tr><td class="n">{e(v["position"])}</td><td>{when(v["created_at"])}</td><td>{e(v["type"])}</td>'
        f'<td>{e(v["stream_id"])} v{e(v["version"])}</td><td><code>{e(_clip(v["data"], 240))}</code></td></tr>'
        for v in found["events"]
    ]
    deliveries = [
        f'<tr><td class="n">{e(d["position"])}</td><td>{e(d["type"])}</td><td>{e(d["subscriber"])}</td>'
        f'<td class="{_status_class(d["status"])}">{e("in flight" if d["inflight"] else d["status"])}</td>'
        f'<td class="n">{e(d["attempts"])}</td><td>{when(d["delivered_at"])}</td>'
        f'<td>{e(_clip(d["last_error"]))}</td></tr>'
        for d in found["deliveries"]
    ]
    letters = [
        f'<tr><td><a href="/dashboard/dead-letters/{e(d["id"])}">#{e(d["id"])}</a></td><td class="n">'
        f'{e(d["position"])}</td><td>{e(d["subscriber"])}</td><td>{e(d["status"])}</td>'
        f'<td><b>{e(d["error_type"])}</b>: {e(_clip(d["error_message"]))}</td><td>{e(d["resolved_by"])}</td></tr>'
        for d in found["dead_letters"]
    ]
    return (
        head
        + f'<p class="muted">Searched the newest {found["window"]:,} events.</p>'
        + f'<h2>Events ({len(events)})</h2>'
        + table(["position", "recorded", "event", "stream", "data"], events, "No event carries this correlation id.")
        + f"<h2>Deliveries ({len(deliveries)})</h2>"
        + table(["position", "event", "subscriber", "status", "attempts", "delivered", "last error"], deliveries,
                "No outbox rows (delivered rows are purged after the retention period)." if found["delivered_kept"]
                else "No delivery waiting or failing.")
        + ("" if found["delivered_kept"] else DELIVERED_GONE)
        + f"<h2>Dead letters ({len(letters)})</h2>"
        + table(["letter", "position", "subscriber", "status", "error", "resolved by"], letters, "None.")
    )


def _status_class(status: str) -> str:
    return {"delivered": "ok", "dead": "bad", "blocked": "warn"}.get(status, "")
