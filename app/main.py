"""create_app(): the Litestar application, its lifespan (database, relay, background tasks)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from litestar import Litestar, MediaType, Response, Router, get
from litestar.di import Provide
from litestar.exceptions import NotFoundException
from litestar.logging import LoggingConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin, YamlRenderPlugin
from litestar.static_files import create_static_files_router
from prometheus_client import CONTENT_TYPE_LATEST

from app import logs, observe
from app.admin import AdminController
from app.bootstrap import System, bootstrap, load_modules
from app.dashboard.routes import dashboard_router
from app.db import Database
from app.embedded import EmbeddedPostgres
from app.http import EXCEPTION_HANDLERS, JSONRequest, edge_middleware
from app.metrics_export import Exporter
from app.metrics_export import register as register_metrics
from app.migrate import head_revision
from app.relay import Relay
from app.remote import internal_endpoint
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

DOCS_ASSETS = Path(__file__).parent / "docs_assets"  # vendored Swagger UI, see its README.md


class Runtime:
    """What one process holds while it serves: the database, the system, the relay."""

    def __init__(self, settings: Settings, *, run_relay: bool = True) -> None:
        self.settings = settings
        self.run_relay = run_relay
        self.system: System | None = None
        self.relay: Relay | None = None
        self.broker = None  # app.broker.runtime.BrokerLink, with SWITCHBOARD_NATS_URL
        self.ready = False
        self._embedded: EmbeddedPostgres | None = None
        self._tasks: list[asyncio.Task] = []

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
        logs.setup_logging(self.settings)  # once per process (each granian worker): logs, then traces
        observe.setup_tracing()
        url = self.settings.database_url
        if url is None:
            self._embedded = EmbeddedPostgres(self.settings.data_dir)
            url = await asyncio.to_thread(self._embedded.database_url)
        db = await Database(url, max_size=self.settings.db_pool_size).connect()
        try:
            self.system = bootstrap(self.settings, db)
            app.state.system = self.system
            await self.system.transport.start()
            if self.run_relay:  # a serving process: relay, background tasks, registry entry
                self.relay = Relay(self.system)
                self.relay.start()
                self._tasks = [asyncio.create_task(task()) for task in self.system.background]
                await self.system.registry.register()
                self.system.registry.start()
                if self.settings.nats_url:  # events (and calls) to the modules behind other databases
                    from app.broker.runtime import BrokerLink

                    self.broker = BrokerLink(self.system)
                    await self.broker.start()
            self.ready = True
            yield
        finally:
            # granian has already stopped accepting and finished in-flight requests by now (nginx
            # sees connection refused and tries the next replica); readiness false covers probes
            # that race the shutdown, then the relay and the registry entry go.
            self.ready = False
            if self.relay is not None:
                await self.relay.stop()  # finishes its batch or releases the claims
            if self.broker is not None:
                await self.broker.stop()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.system is not None:
                if self.run_relay:
                    await self.system.registry.stop()  # deregisters
                await self.system.transport.close()
            await db.close()
            if self._embedded is not None:
                await asyncio.to_thread(self._embedded.stop)  # atexit does not run in server workers
            await asyncio.to_thread(observe.shutdown_tracing)  # the worker's last spans, before it exits

    def mediator(self):
        return self.system.mediator

    def db(self) -> Database:
        return self.system.db


def openapi_config() -> OpenAPIConfig:
    """The API docs at /schema, working with no network: Swagger UI from the assets this package
    ships, the schema as JSON and YAML. Litestar's other UIs load their scripts from CDNs (blank
    pages offline), so they are not served."""
    assets = "/schema/assets/swagger-ui"
    swagger = SwaggerRenderPlugin(
        js_url=f"{assets}/swagger-ui-bundle.js",
        css_url=f"{assets}/swagger-ui.css",
        standalone_preset_js_url=f"{assets}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{assets}/favicon-32x32.png'>",
        path=["/", "/swagger"],
    )
    router = Router(
        "/schema",
        route_handlers=[create_static_files_router("/assets", [DOCS_ASSETS], include_in_schema=False)],
        include_in_schema=False,
        after_request=_unserved_page_is_a_problem,
    )
    return OpenAPIConfig(
        title="Switchboard",
        version="0.1.0",
        path="/schema",
        render_plugins=[swagger, JsonRenderPlugin(), YamlRenderPlugin()],
        openapi_router=router,
    )


def _unserved_page_is_a_problem(response: Response) -> Response:
    # litestar answers a /schema page no plugin serves (/schema/redoc) with an HTML 404 of its
    # own; raised instead, it becomes the problem+json every other 404 is
    if response.status_code == 404:
        raise NotFoundException()
    return response


def create_app(settings: Settings | None = None, *, run_relay: bool = True) -> Litestar:
    settings = settings or get_settings()
    runtime = Runtime(settings, run_relay=run_relay)
    modules = load_modules()
    hosted = set(settings.modules or [m.name for m in modules])
    controllers = [c for m in modules if m.name in hosted for c in m.controllers]

    @get("/health/live", media_type=MediaType.JSON, tags=["health"])
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @get("/health/ready", media_type=MediaType.JSON, tags=["health"])
    async def ready() -> Response[dict[str, str]]:
        if not runtime.ready:
            return Response({"status": "starting or stopping"}, status_code=503)
        try:
            async with asyncio.timeout(2):
                revision = await runtime.db().fetchval("SELECT version_num FROM alembic_version")
        except Exception as error:  # any failure here means: not ready
            return Response({"status": "database unreachable", "error": type(error).__name__}, status_code=503)
        if revision != head_revision():
            return Response({"status": f"migrations at {revision}, code expects {head_revision()}"}, status_code=503)
        # A breaker of a module hosted here refuses that module's calls: so does readiness, until
        # the breaker lets a trial call through. (Breakers of modules hosted elsewhere are that
        # module's outage, shared by every replica here: listed, but not a reason to take this one
        # out of the load balancer, which would also stop what does not need that module.)
        system = runtime.system
        open_breakers = system.mediator.open_breakers()
        local = {m: s for m, s in open_breakers.items() if m in system.hosted}
        if local:
            return Response(
                {"status": "circuit open", "modules": sorted(local)},
                status_code=503,
                headers={"Retry-After": str(max(local.values()))},
            )
        body = {"status": "ready", "instance": settings.instance_id}
        if open_breakers:
            body["unavailable_elsewhere"] = ", ".join(sorted(open_breakers))
        return Response(body, status_code=200)

    register_metrics()  # what /metrics exports; registered once however many apps one process builds
    exporter = Exporter(runtime)

    @get("/metrics", include_in_schema=False)
    async def metrics() -> Response[bytes]:
        return Response(await exporter.scrape(), media_type=CONTENT_TYPE_LATEST)

    handlers = [live, ready, metrics, *controllers]
    if settings.admin_token:
        handlers.extend([AdminController, dashboard_router()])
    else:
        log.warning("operator dashboard off: set SWITCHBOARD_ADMIN_TOKEN to serve it at /dashboard")
    if settings.internal_token:  # modules hosted here can be called by other instances
        handlers.append(internal_endpoint(settings.internal_token, lambda: runtime.system))

    app = Litestar(
        route_handlers=handlers,
        lifespan=[runtime.lifespan, exporter.lifespan],
        dependencies={
            "mediator": Provide(runtime.mediator, sync_to_thread=False),
            "db": Provide(runtime.db, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        request_class=JSONRequest,  # strict JSON bodies: 415, 400, never a 500 or a coercion
        # the root logger is app/logs.py's: litestar's default adds a plain-text handler of its own
        logging_config=LoggingConfig(
            configure_root_logger=False, loggers={"litestar": {"level": "INFO", "handlers": [], "propagate": True}}
        ),
        request_max_body_size=settings.max_body_bytes,
        openapi_config=openapi_config(),
    )
    # Around the router, not per route: 404/405 answers, which match no route, carry the id too.
    app.asgi_handler = edge_middleware(app.asgi_handler)
    app.state.runtime = runtime
    app.state.metrics = exporter
    app.state.admin_token = settings.admin_token
    return app
