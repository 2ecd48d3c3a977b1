"""`create_app(settings)`: the processing service (autoscaler + transcoding workers) as a FastAPI app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from services.common.auth import protect
from services.common.body_limit import bound_request_bodies
from services.common.openapi import document_problems
from services.common.ops import ops_router
from services.common.problems import install_problem_handlers
from services.common.supervisor import Supervisor
from services.processing.api import ACCESS
from services.processing.api import router as api_router
from services.processing.metrics import ProcessingMetrics
from services.processing.service import ProcessingService
from services.processing.settings import ProcessingSettings

DESCRIPTION = """
CatTube's processing service: an autoscaler that follows the `transcode` queue from zero workers
to as many as the backlog needs and back, and asyncio workers that turn each uploaded master into
the requested H.264 renditions and a poster with one ffmpeg process per job.
"""


def create_app(
    settings: ProcessingSettings,
    *,
    exit_on_failure: bool = True,
    router_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """The app; `router_transport` lets tests reach an in-process router (`httpx.ASGITransport`)."""
    metrics = ProcessingMetrics()
    supervisor = Supervisor(exit_on_failure=exit_on_failure)
    service = ProcessingService(settings, metrics, router_transport=router_transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.open()

        def begin_shutdown() -> None:
            supervisor.begin_stop()
            service.begin_shutdown()

        app.state.begin_shutdown = begin_shutdown
        service.start(supervisor)
        await service.blob_check.first_verdict()
        try:
            yield
        finally:
            begin_shutdown()
            await service.close()
            await supervisor.drain(timeout_s=5)

    async def refresh_metrics() -> None:
        metrics.refresh(service.autoscaler, service.pool)

    app = FastAPIOffline(title="CatTube processing", description=DESCRIPTION, version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.processing = service
    install_problem_handlers(app)
    app.include_router(ops_router(metrics.registry, [supervisor.readiness, service.readiness], refresh_metrics))
    app.include_router(api_router)
    protect(app, ACCESS, settings)
    document_problems(app)
    bound_request_bodies(app, settings)
    return app
