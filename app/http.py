"""The HTTP edge: request ids, RFC 9457 problem responses for every error, health probes."""

from __future__ import annotations

import logging
import re
from functools import cache
from os import urandom
from time import perf_counter
from typing import Any

import asyncpg
import msgspec
from litestar import Request, Response
from litestar.exceptions import ClientException, HTTPException, ValidationException
from litestar.types import Empty

from app import context, observe
from app.http_metrics import HTTP_SECONDS
from app.messages import SwitchboardError, Unavailable

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
PLAIN_JSON = b"application/json"
REQUEST_ID = b"x-request-id"
SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
JSON_MEDIA = re.compile(r"application/(?:[\w.-]+\+)?json")  # application/json, application/x+json


def check_json_media(request: Request) -> None:
    """A JSON route takes JSON in UTF-8 (RFC 8259): another media type is a 415, another charset a
    400. No Content-Type at all is taken for JSON."""
    media_type, options = request.content_type
    if media_type and not JSON_MEDIA.fullmatch(media_type):
        raise ClientException(f"Unsupported media type {media_type}: send application/json", status_code=415)
    charset = options.get("charset", "utf-8").strip('"').lower()
    if charset not in ("utf-8", "utf8"):
        raise ClientException(f"Unsupported charset {charset}: send UTF-8 JSON")


@cache
def _decoder(target: Any) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(target)  # strict: "5" is no int


def decode_json(body: bytes, target: Any, request: Request) -> Any:
    """Decode a JSON body as `target`, strictly; whatever the bytes, a failure is a 400 (naming
    the request's route, whose URL is built only then)."""
    try:
        return _decoder(target).decode(body)
    except msgspec.ValidationError as error:
        message, _, path = str(error).partition(" - at `$")
        key = path.rstrip("`").lstrip(".")
        where = f"{request.method} {request.url.path}"
        raise ValidationException(f"Validation failed for {where}", extra=[{"message": message, "key": key, "source": "body"}]) from None
    except msgspec.DecodeError as error:
        raise ClientException(f"Malformed JSON body: {error}") from None
    except RecursionError:  # msgspec recurses per nesting level
        raise ClientException("Malformed JSON body: nested too deeply") from None
    except UnicodeDecodeError:
        raise ClientException("Malformed JSON body: not valid UTF-8") from None


class JSONRequest(Request):
    """Request bodies decoded the one way this app accepts: JSON, UTF-8, strict types, straight
    into the route's body type. Litestar's own path decodes loosely (it turns "5" into 5)."""

    async def json(self) -> Any:
        if self._json is Empty:
            if _content_type(self.scope) != PLAIN_JSON:  # the usual header needs no parsing
                check_json_media(self)
            field = self.route_handler.parsed_data_field
            target = Any if field is None else field.annotation
            self._json = self._connection_state.json = decode_json(await self.body() or b"null", target, self)
        return self._json


def _content_type(scope: Any) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value
    return None


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


def edge_middleware(app):
    """Outermost ASGI wrapper, one layer for what every HTTP request needs: X-Request-ID
    (generated when absent) in the mediator's context and echoed back, the request's duration by
    route template (app/http_metrics.py) and, only when tracing or debug lines are on, its span
    and line. One wrapper and one `send` closure per request: each layer of its own cost a
    coroutine and a closure more on every request."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        started = perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID:
                request_id = value.decode("latin-1")
                break
        if not request_id or not SAFE_ID.fullmatch(request_id):
            request_id = urandom(16).hex()  # as random as uuid4().hex, without building a UUID
        token = context.correlation_id.set(request_id)
        encoded = request_id.encode("latin-1")
        # its span (continuing a caller's traceparent) and its debug line, only when either is on
        observed = observe.Request(scope) if observe.TRACING or observe.DEBUG else None
        status = 500  # nothing sent: the request failed before any response
        replaced = False

        async def send_with_id(message):
            nonlocal replaced, status
            if message["type"] == "http.response.start":
                status = message["status"]
                if observed is not None:
                    observed.status = status
                headers = message.get("headers", [])
                if status >= 400 and scope.get("path", "").startswith("/schema") and _is_html(headers):
                    # The docs plugin answers unknown paths under /schema with an HTML page of its
                    # own: every API error leaves this app as a problem document. (The dashboard's
                    # pages are HTML on purpose, its login form with a 401 among them.)
                    replaced = True
                    await _send_problem(send, status, scope.get("path", ""), encoded)
                    return
                message["headers"] = [*headers, (REQUEST_ID, encoded)]
            elif replaced:  # the HTML page's body: already answered
                return
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        finally:
            if observed is not None:
                observed.end(scope)
            context.correlation_id.reset(token)
            HTTP_SECONDS.record(scope.get("method", ""), scope.get("path_template"), status, perf_counter() - started)

    return middleware


def _is_html(headers) -> bool:
    return any(name.lower() == b"content-type" and value.startswith(b"text/html") for name, value in headers)


async def _send_problem(send, status: int, path: str, request_id: bytes) -> None:
    title = "Not found" if status == 404 else "Error"
    body = msgspec.json.encode({"type": "about:blank", "status": status, "title": title, "instance": path})
    headers = [(b"content-type", PROBLEM.encode()), (b"content-length", str(len(body)).encode()), (REQUEST_ID, request_id)]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
