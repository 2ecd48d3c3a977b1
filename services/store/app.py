"""`create_app(settings)`: the store service (catalog, playback, live stream, web page) as a FastAPI app."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from router.client import RouterClient
from services.common.auth import protect
from services.common.blob_check import BlobStoreCheck
from services.common.blobs import open_blob_store
from services.common.body_limit import bound_request_bodies
from services.common.db import make_database
from services.common.errors import Unavailable
from services.common.openapi import document_problems
from services.common.ops import ops_router
from services.common.outbox import OUTBOX, OutboxRelay
from services.common.problems import install_problem_handlers
from services.common.supervisor import Supervisor
from services.store.api import ACCESS
from services.store.api import router as api_router
from services.store.catalog import Catalog, Outcome
from services.store.feed import Feed
from services.store.live import Change, Live
from services.store.metrics import StoreMetrics
from services.store.pages import Pages
from services.store.peers import PeerChanges
from services.store.playback_api import router as playback_router
from services.store.settings import StoreSettings
from services.store.tables import CATALOG, POSTGRES_SCHEMA

STATIC = Path(__file__).parent / "static"

DESCRIPTION = """
CatTube's store service: a catalog of videos fed only by the router's events (idempotent, forward
only), renditions, posters and HLS playlists and segments streamed from the bucket with HTTP ranges,
`cattube.video.ready` / `.failed` / `.retry-requested` / `.updated` / `.deleted` published through an
outbox, and web pages: `/` (upload, a grid of posters with live status, the autoscaler's chart) and
`/watch/{id}` (one video).
"""


def create_app(
    settings: StoreSettings,
    *,
    exit_on_failure: bool = True,
    router_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """The app; `router_transport` lets tests reach an in-process router (`httpx.ASGITransport`)."""
    metrics = StoreMetrics()
    supervisor = Supervisor(exit_on_failure=exit_on_failure)
    live = Live(settings.live_queue_size)
    db = make_database(
        settings.catalog_database_url,
        path=settings.catalog_file,
        schema=POSTGRES_SCHEMA,
        migrations=[CATALOG, OUTBOX],
        name="catalog",
    )
    peers = PeerChanges(db, live, history_size=settings.scaling_history_size)
    client = RouterClient(settings.router_urls, token=settings.router_token, transport=router_transport)
    # The relay backs off on its own (and stops mid-wait at shutdown): no retries inside the client.
    relay_client = RouterClient(
        settings.router_urls, token=settings.router_token, transport=router_transport, retries=0
    )
    relay = OutboxRelay(db, relay_client)
    feed = Feed(client, name=settings.subscription, url=f"{settings.public_base_url}/inbox")
    blobs = open_blob_store(settings.blob_base_url)
    blob_check = BlobStoreCheck(blobs)

    def on_change(outcome: Outcome) -> None:
        for video in outcome.videos:
            live.publish(Change("video", video=video))
        if outcome.scaled is not None:
            live.publish(Change("scaled", point=outcome.scaled))
        if outcome.announced:
            relay.wake()

    catalog = Catalog(
        db,
        public_url=settings.public_base_url,
        subscription=settings.subscription,
        transcode_subscription=settings.transcode_subscription,
        history_size=settings.scaling_history_size,
        applied_retention_s=settings.applied_retention_s,
        on_change=on_change,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await db.open()

        def begin_shutdown() -> None:
            supervisor.begin_stop()
            live.close()
            relay.stop()
            blob_check.stop()
            peers.stop()

        app.state.begin_shutdown = begin_shutdown
        supervisor.start("blob-check", blob_check.run())
        supervisor.start("outbox-relay", relay.run())
        if db.shared:  # other replicas write the catalog too: show their changes on this replica's pages
            supervisor.start("peer-changes", peers.run())
        feed.start()
        await blob_check.first_verdict()
        try:
            yield
        finally:
            begin_shutdown()
            await feed.stop()
            await supervisor.drain(timeout_s=5)
            await client.aclose()
            await relay_client.aclose()
            await db.close()

    async def refresh_metrics() -> None:
        # While the database is away the catalog's numbers keep their last values; /readyz says why.
        with contextlib.suppress(Unavailable):
            await metrics.refresh(catalog, relay, live)

    app = FastAPIOffline(title="CatTube store", description=DESCRIPTION, version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.catalog = catalog
    app.state.blobs = blobs
    app.state.blob_check = blob_check
    app.state.live = live
    app.state.feed = feed
    app.state.relay = relay
    app.state.peers = peers
    app.state.pages = Pages(STATIC)
    install_problem_handlers(app)
    app.include_router(
        ops_router(
            metrics.registry,
            [supervisor.readiness, db.readiness, feed.readiness, blob_check.readiness],
            refresh_metrics,
        )
    )
    app.include_router(api_router)
    app.include_router(playback_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    protect(app, ACCESS, settings)
    document_problems(app)
    bound_request_bodies(app, settings)
    return app
