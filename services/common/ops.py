"""The operational endpoints every service serves: `/healthz`, `/readyz`, `/metrics`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from services.common.problems import problem_response

ReadinessCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, or a sentence saying what is not."""


def ops_router(
    registry: CollectorRegistry,
    readiness: list[ReadinessCheck],
    before_scrape: Callable[[], Awaitable[None]] | None = None,
) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @router.get("/readyz", response_model=None)
    async def readyz() -> dict[str, str] | Response:
        """Every dependency is reachable and every background loop is running."""
        problems = [p for check in readiness if (p := await check()) is not None]
        if problems:
            return problem_response(503, "Not ready", "; ".join(problems))
        return {"status": "ready"}

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Metrics"}},
    )
    async def metrics() -> Response:
        """Prometheus metrics in the text exposition format."""
        if before_scrape is not None:
            await before_scrape()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
