"""Remote transport: `mediator.send()` to a module hosted by another process, over HTTP.

The caller's code does not change: the mediator's route for a module this process does not host
calls `RemoteTransport.call`, inside the same bulkhead, breaker and deadline as a local call.
Messages travel msgspec-encoded to `POST /internal/messages/{module}.{Type}` on an instance found
in the registry; errors come back as problem+json with a `code` naming the exception class, and are
raised again as the same exception (InsufficientStock stays a 409 at the caller's edge).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import msgspec
from litestar import Request, Response, post
from litestar.exceptions import NotAuthorizedException, NotFoundException
from litestar.params import FromPath

from app import context, observe
from app.deadlines import remaining_seconds
from app.http import check_json_media, problem
from app.messages import CommandRejected, DatabaseUnavailable, SwitchboardError, Unavailable
from app.registry import Registry

log = logging.getLogger(__name__)

INTERNAL_PATH = "/internal/messages"
DEADLINE_HEADER = "X-Switchboard-Deadline"  # seconds the caller had left when it sent the call
# When the caller stops waiting, as wall-clock epoch seconds: the only clock two processes (two
# hosts) share. A relative budget restarts when the receiver reads the request, so a call that
# sat in a paused or overloaded receiver's socket would run after its caller gave up; an absolute
# time does not. Clock skew shifts it: a receiver whose clock runs ahead refuses (or cuts short)
# calls that still had time left by that much; one that runs behind is held to the relative
# budget, which the receiver takes instead whenever it is shorter. Keep the hosts on NTP.
DEADLINE_AT_HEADER = "X-Switchboard-Deadline-At"
MAX_BUDGET = 300.0  # seconds: a caller cannot make a call run longer than this

_encode = msgspec.json.Encoder().encode
_problem = msgspec.json.Decoder(dict[str, Any])


class MessageCatalog:
    """Stable wire names (`inventory.ReserveStock`) for commands and queries, their result types,
    and the error classes modules raise, by class name."""

    def __init__(
        self,
        names: Mapping[type, str],
        results: Mapping[type, Any],
        errors: Mapping[str, type[SwitchboardError]],
    ) -> None:
        self.names = dict(names)
        self.types = {name: t for t, name in names.items()}
        self.errors = dict(errors)
        self._decoders = {t: msgspec.json.Decoder(t) for t in names}
        self._results = {t: msgspec.json.Decoder(r) for t, r in results.items()}

    def decode_message(self, name: str, body: bytes) -> Any:
        message_type = self.types.get(name)
        if message_type is None:
            raise NotFoundException(f"no message type {name!r}")
        return self._decoders[message_type].decode(body)

    def decode_result(self, message_type: type, body: bytes) -> Any:
        return self._results[message_type].decode(body)

    def error_from(self, status: int, body: bytes) -> SwitchboardError:
        try:
            problem = _problem.decode(body)
        except msgspec.DecodeError:
            problem = {}
        detail = str(problem.get("detail") or problem.get("title") or f"remote answered {status}")
        code = str(problem.get("code"))
        if status == 503 and code == DatabaseUnavailable.__name__:  # the shared database: no module's fault
            return DatabaseUnavailable(detail)
        error_type = self.errors.get(code)
        if error_type is None or status >= 500:
            # No module error named: the framework answered (401 wrong internal token, 404 unknown
            # message type, 400 undecodable message: a misconfiguration or a version skew) or the
            # remote failed. The message was not handled: never a business rejection (a 409 at the
            # caller's edge would blame the client), always the remote module's unavailability.
            return Unavailable(f"remote answered {status}: {detail}")
        try:
            return error_type(detail)
        except TypeError:  # an error class with its own constructor (e.g. EarlierRejection)
            error = CommandRejected(detail)
            error.status_code = status  # type: ignore[misc]
            return error


class RemoteTransport:
    def __init__(self, registry: Registry, catalog: MessageCatalog, token: str | None, *, pool_size: int = 200) -> None:
        self.registry = registry
        self.catalog = catalog
        self.token = token
        self.pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=self.pool_size, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=1.0),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def caller(self, module: str, message_type: type):
        """The mediator's handler for a message whose module runs elsewhere. Queries and commands
        marked `idempotent` may be retried on another instance; others only when never sent."""
        idempotent = bool(getattr(message_type, "idempotent", False))

        async def call(message: Any) -> Any:
            return await self.call(module, message, idempotent=idempotent)

        return call

    async def call(self, module: str, message: Any, *, idempotent: bool) -> Any:
        if self._session is None:
            raise Unavailable(f"module {module!r} is remote and the transport is not started")
        endpoints = self.registry.rotation(await self.registry.endpoints(module))
        if not endpoints:
            raise Unavailable(f"no live instance hosts module {module!r}", module=module)
        name = self.catalog.names[type(message)]
        body = _encode(message)
        headers = {
            "content-type": "application/json",
            "authorization": f"Bearer {self.token}",
            "x-request-id": context.current_correlation_id(),
        }
        remaining = remaining_seconds()
        if remaining is not None:  # the callee stops when we stop waiting
            headers[DEADLINE_HEADER] = f"{max(remaining, 0.0):.3f}"
            headers[DEADLINE_AT_HEADER] = f"{time.time() + remaining:.3f}"
        failure = ""
        for instance_id, base_url in endpoints:
            try:
                with observe.span(f"remote {name}", observe.SpanKind.CLIENT, {"switchboard.instance": instance_id}):
                    if observe.TRACING:  # the receiving instance's request span continues this trace
                        observe.inject(headers)
                    async with self._session.post(f"{base_url}{INTERNAL_PATH}/{name}", data=body, headers=headers) as response:
                        payload = await response.read()
                        if response.status == 200:
                            return self.catalog.decode_result(type(message), payload)
                        error = self.catalog.error_from(response.status, payload)
                        if isinstance(error, Unavailable) and not isinstance(error, DatabaseUnavailable):
                            # the remote module's, not the caller's
                            error.module = module
                        # the shared database is down for every instance: trying the next one cannot help
                        if isinstance(error, DatabaseUnavailable) or not (isinstance(error, Unavailable) and idempotent):
                            raise error
                        failure = f"{instance_id} answered {response.status}: {error.detail}"
            except aiohttp.ClientConnectorError as error:
                # The request never left: safe to try the next instance whatever the message.
                failure = f"{instance_id} unreachable: {error}"
                self.registry.forget(module)
            except (aiohttp.ClientError, OSError) as error:
                failure = f"{instance_id} failed mid-call: {error}"
                self.registry.forget(module)
                if not idempotent:  # it may have run there: do not run it twice
                    break
            log.warning("remote call %s to %s failed: %s", name, instance_id, failure)
        raise Unavailable(f"module {module!r} is unavailable: {failure}", module=module)


def caller_budget(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the caller still waits (<= 0: it has given up), from whichever of its deadline
    headers ends first; None if it sent neither (no deadline: the local default applies)."""
    left = []
    for name, start in ((DEADLINE_HEADER, 0.0), (DEADLINE_AT_HEADER, time.time() if now is None else now)):
        try:
            value = float(headers.get(name, "nan")) - start
        except ValueError:
            continue
        if value == value:  # not NaN
            left.append(value)
    return min(min(left), MAX_BUDGET) if left else None


def internal_endpoint(token: str, get_system):
    """The receiving side: authenticated, decodes the message, runs it through the local mediator.
    Its trace continues the caller's: the request's span (app/http.py) takes the `traceparent`
    the caller injected as its parent."""
    expected = token.encode()

    @post(f"{INTERNAL_PATH}/{{name:str}}", status_code=200, include_in_schema=False)
    async def receive(name: FromPath[str], request: Request) -> Response[bytes]:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), expected):
            raise NotAuthorizedException("internal calls need the shared internal token")
        system = get_system()
        check_json_media(request)
        try:
            # Strict, and the message's own __post_init__ checks its invariants: a peer (or anyone
            # with the token) is refused what the HTTP edge refuses, with the same error class.
            message = system.transport.catalog.decode_message(name, await request.body())
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as error:
            detail = "nested too deeply" if isinstance(error, RecursionError) else str(error)
            return problem(400, "Invalid message", detail, instance=request.url.path)
        result = await system.mediator.dispatch_local(message, budget=caller_budget(request.headers))
        return Response(_encode(result), media_type="application/json")

    return receive
