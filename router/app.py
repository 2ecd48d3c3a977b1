"""`create_app(settings)`: the event router as a FastAPI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig
from fastapi_offline import FastAPIOffline

from router.api import ACCESS, ensure_owner
from router.api import router as api_router
from router.bus import Bus
from router.front import open_front_door
from router.hot_routes import hot_routes
from router.metrics import RouterMetrics
from router.push_policy import PushPolicy
from router.settings import RouterSettings
from router.stores import store_factory
from router.stream_api import STREAM_ROUTE
from services.common.auth import protect
from services.common.body_limit import bound_request_bodies
from services.common.openapi import document_problems
from services.common.ops import ops_router
from services.common.problems import install_problem_handlers
from services.common.supervisor import Supervisor

DESCRIPTION = """
CatTube's event router: a durable event bus (CloudEvents 1.0) with content-based subscriptions
(EventBridge event patterns) delivering to SQS-style queues or, by push, to HTTP consumers.
"""

# FastAPI's native OpenTelemetry asks the global providers (reading os.environ) on every request whether
# they are configured; CatTube configures none, so the router says so once.
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def create_app(
    settings: RouterSettings, *, exit_on_failure: bool = True, push_policy: PushPolicy | None = None
) -> FastAPI:
    """The app; `push_policy` replaces the one built from the settings (tests give it a resolver)."""
    make_store = store_factory(settings)  # a URL naming no usable store fails here, at start
    policy = push_policy or PushPolicy(settings.push_networks)
    metrics = RouterMetrics()
    supervisor = Supervisor(exit_on_failure=exit_on_failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store, notifier = make_store()
        bus = Bus(
            store,
            retention_s=settings.retention_s,
            purge_interval_s=settings.purge_interval_s,
            push_policy=policy,
            notifier=notifier,
            max_streams=settings.max_streams,
            max_subscriptions=settings.max_subscriptions,
        )
        await bus.start()
        app.state.bus = bus

        def begin_shutdown() -> None:
            supervisor.begin_stop()
            bus.stop()

        app.state.begin_shutdown = begin_shutdown
        supervisor.start("bus-writer", bus.run_writer())
        supervisor.start("retention", bus.run_retention())
        try:
            yield
        finally:
            begin_shutdown()
            await supervisor.drain(timeout_s=10)
            await bus.close()

    app = FastAPIOffline(
        title="CatTube router", description=DESCRIPTION, version="0.1.0", lifespan=lifespan, telemetry=NO_TELEMETRY
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_problem_handlers(app)
    app.include_router(
        ops_router(
            metrics.registry,
            [
                supervisor.readiness,
                lambda: app.state.bus.readiness(),
                lambda: app.state.bus.dispatchers.readiness(),
            ],
            before_scrape=lambda: metrics.refresh(app.state.bus),
        )
    )
    app.include_router(api_router)
    # The hot paths skip FastAPI's per-request machinery (dependency solving, body and response models):
    # plain ASGI routes matched first (router/hot_routes.py). FastAPI's routes stay for /docs.
    app.router.routes[0:0] = hot_routes(api_router.routes, ensure_owner)
    protect(app, ACCESS, settings)
    document_problems(app)
    app.router.routes.insert(0, STREAM_ROUTE)  # served as plain ASGI, as the hot paths are (router/stream_api.py)
    bound_request_bodies(app, settings, streaming=[("POST", "/events")])  # publish bounds its own (max_request_bytes)
    # The hot routes again, ahead of the whole stack: their checks done inline (router/front.py).
    return open_front_door(app, settings)
