"""HTML building blocks: every value goes through `e()` (html.escape) on its way into markup;
the layout, the login form and the CSRF-carrying action forms."""

from __future__ import annotations

import html
from datetime import datetime
from typing import Any

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:center}
header a{color:#fff}header form{margin-left:auto}main{padding:1em 1.2em}
h1{font-size:1.2em;margin:0}h2{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff;width:100%;margin-bottom:.6em}
th,td{border:1px solid #d8dce3;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eceff4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#fff;border:1px solid #d8dce3;padding:.6em;overflow:auto;max-height:24em;margin:.3em 0}
.ok{color:#176b2c}.warn{color:#a15c00}.bad{color:#b3261e;font-weight:600}.muted{color:#68707d}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(28em,1fr));gap:0 1.5em}
form.inline{display:inline}button{cursor:pointer}
.login{max-width:22em;margin:4em auto;background:#fff;padding:1.5em;border:1px solid #d8dce3}
.login label{display:block;margin:.6em 0 .2em}.login input{width:100%;box-sizing:border-box}
.error{background:#fde8e6;border:1px solid #b3261e;padding:.5em;margin:.5em 0}
"""

# No inline script may run (htmx is loaded from this server); inline styles are ours.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def e(value: Any) -> str:
    """Escaped text for markup: the one way a value enters the page."""
    return "" if value is None else html.escape(str(value), quote=True)


def age(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def when(moment: datetime | None) -> str:
    return "–" if moment is None else e(moment.isoformat(timespec="seconds"))


def page(title: str, body: str, who: str | None = None, csrf: str | None = None) -> str:
    logout = ""
    if who is not None:
        logout = f'<span class="muted">{e(who)}</span>'
        if csrf is not None:  # a Bearer client has no session to end
            logout = action_form("/dashboard/logout", "Log out", csrf) + " " + logout
    nav = '<a href="/dashboard">Overview</a>' if who is not None else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width"><title>{e(title)} · Switchboard</title>'
        f'<style>{STYLE}</style><script src="/dashboard/static/htmx.min.js" defer></script></head>'
        f"<body><header><h1>Switchboard</h1>{nav}{search_form() if who else ''}"
        f'{logout}</header><main>{body}</main></body></html>'
    )


def search_form(value: str = "") -> str:
    return (
        '<form class="inline" method="get" action="/dashboard/search">'
        f'<input name="correlation_id" placeholder="correlation id" size="34" value="{e(value)}" '
        'aria-label="correlation id"> <button type="submit">Search</button></form>'
    )


def action_form(action: str, label: str, csrf: str | None, name: str | None = None) -> str:
    """A POST button; a session's form carries its CSRF token (a Bearer client needs none)."""
    hidden = f'<input type="hidden" name="csrf_token" value="{e(csrf)}">' if csrf else ""
    named = f' name="{e(name)}"' if name else ""
    return (
        f'<form class="inline" method="post" action="{e(action)}">{hidden}'
        f'<button type="submit"{named}>{e(label)}</button></form>'
    )


def login_page(message: str | None = None) -> str:
    error = f'<p class="error" role="alert">{e(message)}</p>' if message else ""
    body = (
        '<form class="login" method="post" action="/dashboard/login"><h2>Operator dashboard</h2>'
        f"{error}"
        '<label for="name">Your name (recorded with replays and discards)</label>'
        '<input id="name" name="name" value="operator" maxlength="40" pattern="[A-Za-z0-9_@.\\-]{1,40}" required>'
        '<label for="token">Admin token (SWITCHBOARD_ADMIN_TOKEN)</label>'
        '<input id="token" name="token" type="password" autocomplete="current-password" required>'
        '<p><button type="submit">Log in</button></p></form>'
    )
    return page("Log in", body)


def table(headers: list[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{e(empty)}</p>'
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
