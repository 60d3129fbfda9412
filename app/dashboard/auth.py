"""Who is asking: a Bearer token (scripts) or a signed session cookie (people), and CSRF checks.

The cookie never holds the admin token: it holds the operator's name, when it was issued and a
random session id, signed with an HMAC keyed by the token. Changing the token therefore ends
every session. The CSRF token is another HMAC of the session id, so it needs no server state."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from litestar import Request
from litestar.datastructures import Cookie
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException

COOKIE = "switchboard_dashboard"
SESSION_SECONDS = 12 * 3600
NAME = re.compile(r"[A-Za-z0-9_@.-]{1,40}")


@dataclass(frozen=True)
class Operator:
    who: str
    csrf: str | None  # None for a Bearer client: no ambient credential a foreign page could ride on


def _sign(token: str, *parts: str) -> str:
    return hmac.new(token.encode(), "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()


def token_matches(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def new_session(token: str, who: str, secure: bool) -> Cookie:
    issued, sid = str(int(time.time())), secrets.token_urlsafe(16)
    value = ":".join((who, issued, sid, _sign(token, "session", who, issued, sid)))
    return Cookie(
        key=COOKIE,
        value=value,
        path="/dashboard",
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=secure,
    )


def ended_session(secure: bool) -> Cookie:
    return Cookie(key=COOKIE, value="", path="/dashboard", max_age=0, httponly=True, samesite="strict", secure=secure)


def _from_cookie(value: str, token: str) -> Operator | None:
    parts = value.split(":")
    if len(parts) != 4:
        return None
    who, issued, sid, signature = parts
    if not token_matches(signature, _sign(token, "session", who, issued, sid)):
        return None
    if not issued.isdigit() or not 0 <= time.time() - int(issued) <= SESSION_SECONDS:
        return None
    return Operator(who=who, csrf=_sign(token, "csrf", sid))


def authenticate(request: Request, token: str) -> Operator | None:
    """The operator behind the request; None without credentials. A wrong Bearer is a 401 (a
    script should fail loudly); a wrong or expired cookie is just no session (the login form)."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not token_matches(given, token):
            raise NotAuthorizedException("a valid admin bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        host = request.client.host if request.client else "unknown"
        return Operator(who=f"bearer@{host}", csrf=None)
    cookie = request.cookies.get(COOKIE)
    return _from_cookie(cookie, token) if cookie else None


def check_csrf(request: Request, operator: Operator, form_token: str | None) -> None:
    """A cookie-borne POST must carry its session's CSRF token (SameSite=Strict already keeps the
    cookie off cross-site requests; the token also covers same-site pages and old browsers). No
    Origin check: behind a proxy the Host header names the upstream, and with no-referrer
    browsers send `Origin: null` on form posts."""
    if operator.csrf is None:
        return
    if not form_token or not token_matches(form_token, operator.csrf):
        raise PermissionDeniedException("missing or wrong CSRF token: reload the dashboard and try again")


def is_secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
