"""Commands and queries across databases: `mediator.send()` to a module hosted by another process
group, over NATS request-reply (issue 15). The same role as app/remote.py's RemoteTransport, which
finds instances in the `registry` table of a database both sides share; here the subject is the
address: `switchboard.rpc.<module>.<Type>`, answered by a queue group per module, so NATS spreads
the calls over the module's replicas and a call nobody serves fails at once (no responders).

Both ends speak what the HTTP transport speaks: the message msgspec-encoded, the same deadline
headers (relative and absolute: a late call is refused, not run), the internal token, the
correlation id and `traceparent`. The reply is the result, or the problem document the HTTP
endpoint would answer -- mapped by its own exception handlers, with its status in a header -- so
`MessageCatalog.error_from` raises the same exception on the caller's side (InsufficientStock is
still a 409 at the caller's edge).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from os import urandom
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
from litestar.exceptions import NotAuthorizedException
from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from app import context, observe
from app.broker.stream import CONTEXT_HEADERS
from app.deadlines import remaining_seconds
from app.http import EXCEPTION_HANDLERS, SAFE_ID, problem
from app.messages import DatabaseUnavailable, Unavailable
from app.remote import DEADLINE_AT_HEADER, DEADLINE_HEADER, MessageCatalog, caller_budget

if TYPE_CHECKING:
    from app.bootstrap import System

log = logging.getLogger("app.broker")

PREFIX = "switchboard.rpc"
STATUS_HEADER = "Switchboard-Status"  # the HTTP status the internal endpoint would have answered
CORRELATION_HEADER = CONTEXT_HEADERS["correlation_id"]
AUTH_HEADER = "Authorization"
CLOSE_TIMEOUT = 10.0  # seconds close() lets the calls being answered finish

_encode = msgspec.json.Encoder().encode
_propagator = TraceContextTextMapPropagator()


class NatsTransport:
    """The mediator's handler for a message whose module is hosted by another process group, and
    the responders for the modules hosted here."""

    def __init__(
        self, catalog: MessageCatalog, token: str | None, *, prefix: str = PREFIX, default_timeout: float = 5.0
    ) -> None:
        self.catalog = catalog
        self.token = token
        self.prefix = prefix
        self.default_timeout = default_timeout  # a call outside any mediator deadline
        self._auth = {AUTH_HEADER: f"Bearer {token}"} if token else {}
        self._expected = self._auth[AUTH_HEADER].encode() if token else None
        self._nc: Any = None
        self._system: System | None = None
        self._subscriptions: list[Any] = []
        self._answering: set[asyncio.Task] = set()

    def subject(self, message_type: type) -> str:
        return f"{self.prefix}.{self.catalog.names[message_type]}"

    async def start(self) -> None:
        """Nothing to do until attach(): the connection is the runtime's."""

    async def attach(self, nc: Any, system: System) -> None:
        """Bind the connected client (for calls out) and answer every command and query of the
        modules hosted here, in one queue group per module: replicas share the calls."""
        self._nc, self._system = nc, system
        for module in system.modules:
            if module.name not in system.hosted:
                continue
            for message_type in (*module.commands, *module.queries):
                subject = self.subject(message_type)
                receive = self._receiver(message_type, subject)
                self._subscriptions.append(await nc.subscribe(subject, queue=module.name, cb=receive))
        await nc.flush()  # the server knows the responders before anyone is told this process is ready

    async def close(self) -> None:
        """Stop taking calls (the queue group's other members get them), answer the ones taken."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            with contextlib.suppress(nats.errors.Error):  # connection already closed or draining
                await subscription.drain()
        if self._answering:
            _, late = await asyncio.wait(set(self._answering), timeout=CLOSE_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._nc = self._system = None

    # -- calling ---------------------------------------------------------------------------------

    def caller(self, module: str, message_type: type) -> Callable[[Any], Awaitable[Any]]:
        subject = self.subject(message_type)

        async def call(message: Any) -> Any:
            return await self.call(module, subject, message)

        return call

    async def call(self, module: str, subject: str, message: Any) -> Any:
        nc = self._nc
        if nc is None:
            raise Unavailable(f"module {module!r} is remote and the transport is not connected to NATS", module=module)
        headers = {CORRELATION_HEADER: context.current_correlation_id(), **self._auth}
        remaining = remaining_seconds()
        timeout = self.default_timeout if remaining is None else remaining
        if remaining is not None:  # the callee stops when we stop waiting
            if remaining <= 0:  # never sent: it would only be refused there
                raise Unavailable(f"{subject}: no time left to call", module=module)
            headers[DEADLINE_HEADER] = f"{remaining:.3f}"
            headers[DEADLINE_AT_HEADER] = f"{time.time() + remaining:.3f}"
        with observe.span(f"rpc {subject}", observe.SpanKind.CLIENT, {"messaging.system": "nats"}):
            if observe.TRACING:  # the responder's span continues this trace
                observe.inject(headers)
            try:
                reply = await nc.request(subject, _encode(message), timeout=timeout, headers=headers)
            except nats.errors.NoRespondersError:
                # never delivered to anyone: nothing ran, whatever the message
                raise Unavailable(f"no instance of module {module!r} answers {subject}", module=module) from None
            except nats.errors.TimeoutError:
                # it may have run there: the mediator's rules decide about a retry, not the transport
                raise Unavailable(f"{subject}: no reply within {timeout:.3g}s", module=module) from None
            except nats.errors.Error as error:  # connection closed, draining, payload too big
                raise Unavailable(f"{subject}: NATS failed: {error}", module=module) from None
        status = _status(reply.headers)
        if status == 200:
            return self.catalog.decode_result(type(message), reply.data)
        error = self.catalog.error_from(status, reply.data)
        if isinstance(error, Unavailable) and not isinstance(error, DatabaseUnavailable):
            error.module = module  # the remote module's, not the caller's
        raise error

    # -- answering -------------------------------------------------------------------------------

    def _receiver(self, message_type: type, subject: str) -> Callable[[Any], Awaitable[None]]:
        name = self.catalog.names[message_type]

        async def receive(msg: Any) -> None:
            # The client runs a subscription's callbacks one after the other: each call gets its
            # own task, so one slow handler does not hold up the calls behind it.
            task = asyncio.create_task(self._answer(msg, name, subject))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

        return receive

    async def _answer(self, msg: Any, name: str, subject: str) -> None:
        if not msg.reply:  # published, not requested: nobody waits for it, so it does not run
            log.warning("%s arrived without a reply subject; not run", subject)
            return
        headers = msg.headers or {}
        given = headers.get(CORRELATION_HEADER)
        token = context.correlation_id.set(given if given and SAFE_ID.fullmatch(given) else urandom(16).hex())
        try:
            with _continued(subject, headers):
                status, body, extra = await self._run(name, subject, msg.data, headers)
            try:
                # not msg.respond(): it would send the request's headers (the token) back
                await self._nc.publish(msg.reply, body, headers={STATUS_HEADER: str(status), **extra})
            except (nats.errors.Error, AttributeError) as error:  # AttributeError: closed meanwhile
                log.warning("could not answer %s: %r", subject, error)
        finally:
            context.correlation_id.reset(token)

    async def _run(self, name: str, subject: str, data: bytes, headers: Mapping[str, str]) -> tuple[int, bytes, dict]:
        try:
            if self._expected is not None and not hmac.compare_digest(headers.get(AUTH_HEADER, "").encode(), self._expected):
                raise NotAuthorizedException("internal calls need the shared internal token")
            try:
                # Strict, with the message's own __post_init__: refused what the HTTP edge refuses.
                message = self.catalog.decode_message(name, data)
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as error:
                detail = "nested too deeply" if isinstance(error, RecursionError) else str(error)
                return _reply(problem(400, "Invalid message", detail, instance=subject))
            result = await self._system.mediator.dispatch_local(message, budget=caller_budget(headers))
            return 200, _encode(result), {}
        except Exception as error:  # answered, as the HTTP endpoint answers it; never kills the subscription
            return problem_reply(error, subject)


class _Origin:
    """What the HTTP exception handlers read of a request: the call's subject stands for its path."""

    def __init__(self, subject: str) -> None:
        self.method = "NATS"
        self.url = self
        self.path = subject


def problem_reply(error: Exception, subject: str) -> tuple[int, bytes, dict]:
    """Status, problem body and headers of `error`, from app/http.py's own exception handlers
    (the most specific class first, as litestar picks them): the same answer as over HTTP."""
    handler = next(EXCEPTION_HANDLERS[c] for c in type(error).__mro__ if c in EXCEPTION_HANDLERS)
    return _reply(handler(_Origin(subject), error))  # type: ignore[arg-type]


def _reply(response: Any) -> tuple[int, bytes, dict]:
    return response.status_code, _encode(response.content), {k: str(v) for k, v in (response.headers or {}).items()}


def _status(headers: Mapping[str, str] | None) -> int:
    """The reply's status; none or garbage: a responder that is not ours (a bad gateway)."""
    try:
        return int((headers or {}).get(STATUS_HEADER, ""))
    except ValueError:
        return 502


@contextlib.contextmanager
def _continued(subject: str, headers: Mapping[str, str]) -> Iterator[None]:
    """The responder's span, a child of the caller's (its `traceparent`), only when tracing."""
    if not observe.TRACING:
        yield
        return
    attached = otel_context.attach(_propagator.extract(dict(headers)))
    try:
        with observe.span(f"rpc {subject}", observe.SpanKind.SERVER, {"messaging.system": "nats"}):
            yield
    finally:
        otel_context.detach(attached)
