"""The HTTP edge: request ids, RFC 9457 problem responses for every error, health probes."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import asyncpg
from litestar import Request, Response
from litestar.exceptions import HTTPException

from app import context, observe
from app.messages import SwitchboardError, Unavailable

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
REQUEST_ID = b"x-request-id"
SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def problem(status: int, title: str, detail: str = "", headers: dict[str, str] | None = None, **extra: Any):
    body: dict[str, Any] = {"type": "about:blank", "status": status, "title": title}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return Response(body, status_code=status, media_type=PROBLEM, headers=headers)


def on_switchboard_error(request: Request, error: SwitchboardError) -> Response:
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, Unavailable) else None
    # `code` names the error class: the remote transport raises the same class on the caller's side
    return problem(error.status_code, error.title, error.detail, headers, instance=request.url.path,
                   code=type(error).__name__)


def on_http_exception(request: Request, error: HTTPException) -> Response:
    extra: dict[str, Any] = {}
    if error.extra:
        extra["errors" if isinstance(error.extra, list) else "extra"] = error.extra
    title = error.detail if error.status_code < 500 else "Internal error"
    return problem(error.status_code, title, headers=error.headers, instance=request.url.path, **extra)


def on_database_down(request: Request, error: Exception) -> Response:
    log.warning("database unavailable: %s", error)
    return problem(
        503, "Service unavailable", "the database cannot be reached", {"Retry-After": "1"}, instance=request.url.path
    )


def on_unexpected(request: Request, error: Exception) -> Response:
    if isinstance(error, (OSError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError)):
        return on_database_down(request, error)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "Internal error", "an unexpected error occurred; it has been logged",
                   instance=request.url.path, request_id=context.correlation_id.get())


EXCEPTION_HANDLERS = {
    SwitchboardError: on_switchboard_error,
    HTTPException: on_http_exception,
    asyncpg.PostgresConnectionError: on_database_down,
    asyncpg.CannotConnectNowError: on_database_down,
    asyncpg.TooManyConnectionsError: on_database_down,
    ConnectionError: on_database_down,
    Exception: on_unexpected,
}


def request_id_middleware(app):
    """Carry X-Request-ID (generated when absent) into the mediator's context and echo it back."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        request_id = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID:
                request_id = value.decode("latin-1")
                break
        if not request_id or not SAFE_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        token = context.correlation_id.set(request_id)
        encoded = request_id.encode("latin-1")
        # its span (continuing a caller's traceparent) and its debug line, only when either is on
        observed = observe.Request(scope) if observe.TRACING or observe.DEBUG else None

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID, encoded)]
                if observed is not None:
                    observed.status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            if observed is not None:
                observed.end(scope)
            context.correlation_id.reset(token)

    return middleware
