"""The API docs under /schema work with no network: every page the app serves loads its scripts,
styles and icon from the app itself, and the UIs that would need a CDN are not served."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from app.main import create_app
from app.settings import Settings

PROBLEM = "application/problem+json"
HOST = "testserver"
REMOVED = ["/schema/redoc", "/schema/elements", "/schema/rapidoc", "/schema/scalar", "/schema/stoplight"]


class Assets(HTMLParser):
    """The URLs a page makes the browser fetch, with what each is for."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []  # (kind, url)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.found.append(("script", a["src"]))
        elif tag == "link" and a.get("href"):
            self.found.append((a.get("rel") or "link", a["href"]))
        elif tag in ("img", "iframe") and a.get("src"):
            self.found.append((tag, a["src"]))


def served_schema_pages(app) -> list[str]:
    """Every fixed GET path under /schema in the app's route table (not the assets' or the
    not-found catch-all's parameterised paths)."""
    return sorted(
        route.path
        for route in app.routes
        if route.path.startswith("/schema") and "{" not in route.path and "GET" in route.methods
    )


@pytest.fixture(scope="module")
def app():
    return create_app(Settings(instance_id="docs"), run_relay=False)


@pytest.fixture
async def http(app):
    # the docs need no database: the app is driven without its lifespan
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{HOST}") as client:
        yield client


def test_the_app_serves_swagger_ui_and_the_schema_files(app):
    assert {"/schema", "/schema/swagger", "/schema/openapi.json"} <= set(served_schema_pages(app))


async def test_no_schema_page_names_another_host(app, http):
    for path in served_schema_pages(app):
        response = await http.get(path)
        assert response.status_code == 200, path
        hosts = {urlsplit(url).hostname for url in re.findall(r"(?:https?:)?//[\w.-]+[^\s\"'<>)]*", response.text)}
        assert hosts <= {HOST}, (path, hosts)


async def test_every_asset_a_schema_page_references_is_served_locally_with_its_type(app, http):
    checked = 0
    for path in served_schema_pages(app):
        response = await http.get(path)
        if not response.headers["content-type"].startswith("text/html"):
            continue
        parser = Assets()
        parser.feed(response.text)
        for kind, url in parser.found:
            absolute = urljoin(f"http://{HOST}{path}", url)
            assert urlsplit(absolute).hostname == HOST, (path, url)
            asset = await http.get(absolute)
            assert asset.status_code == 200, (path, url)
            content_type = asset.headers["content-type"]
            if kind == "script":
                assert content_type.split(";")[0] in ("text/javascript", "application/javascript"), (url, content_type)
            elif kind == "stylesheet":
                assert content_type.startswith("text/css"), (url, content_type)
            elif kind == "icon":
                assert content_type.startswith("image/"), (url, content_type)
            else:
                pytest.fail(f"{path} references {url} as {kind}: not a script, stylesheet or icon")
            assert asset.content, url
            checked += 1
    assert checked >= 3  # Swagger UI's bundle, preset and stylesheet at least


async def test_swagger_ui_page_loads_the_vendored_bundle_and_inlines_the_schema(http):
    response = await http.get("/schema/swagger")

    assert '<script src="/schema/assets/swagger-ui/swagger-ui-bundle.js"' in response.text
    assert '"/orders"' in response.text  # the spec is in the page: nothing else to fetch


@pytest.mark.parametrize("path", REMOVED)
async def test_a_docs_page_that_would_need_a_cdn_is_a_404_problem(http, path):
    response = await http.get(path)

    assert response.status_code == 404
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["status"] == 404


async def test_a_missing_asset_is_a_404_problem(http):
    response = await http.get("/schema/assets/swagger-ui/nothing-here.js")

    assert response.status_code == 404
    assert response.headers["content-type"].startswith(PROBLEM)


async def test_the_openapi_json_still_describes_the_routes(http):
    response = await http.get("/schema/openapi.json")

    assert response.status_code == 200
    assert "/orders" in response.json()["paths"]
