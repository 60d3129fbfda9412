"""The dashboard's routes under /dashboard; only registered when SWITCHBOARD_ADMIN_TOKEN is set.

Pages without credentials show the login form and nothing else; the live panel and every POST
answer 401 instead. Replay and discard go through app/relay/dead_letters.py, as the CLI and the
admin API do, with `dashboard:<who>` as the actor."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated

from litestar import MediaType, Request, Response, Router, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException, NotFoundException
from litestar.params import FromQuery, PathParameter
from litestar.response import Redirect

from app.dashboard import auth, queries
from app.dashboard.html import SECURITY_HEADERS, login_page, page
from app.dashboard.panels import letter_page, overview_page, overview_panel, search_page
from app.db import Database
from app.relay import dead_letters as dlq

STATIC = Path(__file__).parent / "static"
LetterId = Annotated[int, PathParameter(ge=1, le=2**63 - 1)]  # dead_letters.id is a bigint


def _html(body: str, status: int = 200, **kwargs) -> Response[str]:
    return Response(body, status_code=status, media_type=MediaType.HTML, headers=SECURITY_HEADERS, **kwargs)


def _token(request: Request) -> str:
    return request.app.state.admin_token


def _system(request: Request):
    return request.app.state.runtime.system


def _required(request: Request) -> auth.Operator:
    operator = auth.authenticate(request, _token(request))
    if operator is None:
        raise NotAuthorizedException("log in at /dashboard or send the admin token as a Bearer")
    return operator


@get(["/", ""], include_in_schema=False)
async def home(request: Request, db: NamedDependency[Database]) -> Response[str]:
    operator = auth.authenticate(request, _token(request))
    if operator is None:
        return _html(login_page())
    data = await queries.overview(db, _system(request))
    return _html(page("Overview", overview_page(data, operator.csrf), operator.who, operator.csrf))


@get("/panel", include_in_schema=False)
async def panel(request: Request, db: NamedDependency[Database]) -> Response[str]:
    operator = auth.authenticate(request, _token(request))
    if operator is None:
        if request.headers.get("hx-request"):  # an expired session: htmx sends the page to the login form
            return Response("", status_code=200, headers={"HX-Redirect": "/dashboard"})
        raise NotAuthorizedException("log in at /dashboard or send the admin token as a Bearer")
    data = await queries.overview(db, _system(request))
    return _html(overview_panel(data, operator.csrf))


@get("/dead-letters/{letter_id:int}", include_in_schema=False)
async def letter(request: Request, letter_id: LetterId, db: NamedDependency[Database]) -> Response[str]:
    operator = auth.authenticate(request, _token(request))
    if operator is None:
        return _html(login_page())
    found = await dlq.get_dead_letter(db, letter_id)
    if found is None:
        raise NotFoundException(f"no dead letter {letter_id}")
    return _html(page(f"Dead letter {letter_id}", letter_page(found, operator.csrf), operator.who, operator.csrf))


@post("/dead-letters/{letter_id:int}/replay", status_code=303, include_in_schema=False)
async def replay(request: Request, letter_id: LetterId, db: NamedDependency[Database]) -> Response:
    return await _resolve(request, dlq.replay, letter_id, db)


@post("/dead-letters/{letter_id:int}/discard", status_code=303, include_in_schema=False)
async def discard(request: Request, letter_id: LetterId, db: NamedDependency[Database]) -> Response:
    return await _resolve(request, dlq.discard, letter_id, db)


async def _resolve(request: Request, action, letter_id: int, db: Database) -> Response:
    operator = _required(request)
    form = await request.form()
    auth.check_csrf(request, operator, form.get("csrf_token"))
    if not await action(db, [letter_id], f"dashboard:{operator.who}"):
        if await dlq.get_dead_letter(db, letter_id) is None:
            raise NotFoundException(f"no dead letter {letter_id}")
        # already replayed or discarded (another operator, the CLI): its page says by whom
    return Redirect(f"/dashboard/dead-letters/{letter_id}", status_code=303)


@get("/search", include_in_schema=False)
async def search(
    request: Request, db: NamedDependency[Database], correlation_id: FromQuery[str] = ""
) -> Response[str]:
    operator = auth.authenticate(request, _token(request))
    if operator is None:
        return _html(login_page())
    wanted = correlation_id.strip()
    if not wanted:
        body = search_page("", None)
    elif not queries.CORRELATION_ID.fullmatch(wanted):
        body = search_page(wanted, None, "A correlation id is 1 to 128 letters, digits or . _ : -")
    else:
        body = search_page(wanted, await queries.correlation(db, _system(request), wanted))
    return _html(page("Search", body, operator.who, operator.csrf))


@post("/login", status_code=303, include_in_schema=False)
async def login(request: Request) -> Response:
    form = await request.form()
    name, given = (form.get("name") or "operator").strip(), form.get("token") or ""
    if not auth.token_matches(given, _token(request)):
        return _html(login_page("Wrong admin token."), status=401)
    if not auth.NAME.fullmatch(name):
        return _html(login_page("A name is 1 to 40 letters, digits or _ @ . -"), status=400)
    cookie = auth.new_session(_token(request), name, auth.is_secure(request))
    return Redirect("/dashboard", status_code=303, cookies=[cookie])


@post("/logout", status_code=303, include_in_schema=False)
async def logout(request: Request) -> Response:
    operator = _required(request)
    form = await request.form()
    auth.check_csrf(request, operator, form.get("csrf_token"))
    return Redirect("/dashboard", status_code=303, cookies=[auth.ended_session(auth.is_secure(request))])


@cache
def _static(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@get("/static/htmx.min.js", include_in_schema=False)
async def htmx() -> Response[bytes]:
    return Response(
        _static("htmx.min.js"),
        media_type="text/javascript; charset=utf-8",
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


def dashboard_router() -> Router:
    return Router(
        path="/dashboard",
        route_handlers=[home, panel, letter, replay, discard, search, login, logout, htmx],
        tags=["dashboard"],
    )
