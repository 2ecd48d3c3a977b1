"""`create_app(settings)`: the upload service as a FastAPI app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from router.client import RouterClient, full_jitter
from services.common.auth import protect
from services.common.blob_check import BlobStoreCheck
from services.common.blobs import open_blob_store
from services.common.body_limit import bound_request_bodies
from services.common.db import make_database
from services.common.errors import Unavailable
from services.common.openapi import document_problems
from services.common.ops import ReadinessCheck, ops_router
from services.common.problems import install_problem_handlers
from services.common.supervisor import Supervisor
from services.upload import tus_api
from services.upload.api import ACCESS
from services.upload.api import router as api_router
from services.upload.metrics import UploadMetrics
from services.upload.outbox import MIGRATIONS, POSTGRES_SCHEMA, Outbox
from services.upload.partials import Partials
from services.upload.resumable import ExpirySweeper, Resumable
from services.upload.settings import UploadSettings
from services.upload.uploads import Uploads

DESCRIPTION = """
CatTube's upload service: streams a master video into the bucket while hashing it, probes it in a
sandboxed child process (only self-contained video containers pass), and announces it with a
`cattube.video.uploaded` event through a local outbox, so uploads keep working while the router is down.
Large files can be sent resumably with tus 1.0 at `/uploads`: the last byte takes the same path.
"""
ROUTER_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 15.0

log = logging.getLogger(__name__)


def create_app(
    settings: UploadSettings,
    *,
    exit_on_failure: bool = True,
    router_transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The app; `router_transport` lets tests reach an in-process router (`httpx.ASGITransport`), `clock`
    moves resumable uploads' expiry."""
    metrics = UploadMetrics()
    supervisor = Supervisor(exit_on_failure=exit_on_failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            store = open_blob_store(settings.blob_base_url)
            blob_check = BlobStoreCheck(store)
            app.state.blob_check = blob_check
            db = make_database(
                settings.outbox_database_url,
                path=settings.outbox_file,
                schema=POSTGRES_SCHEMA,
                migrations=MIGRATIONS,
                name="upload outbox",
            )
            # On a database replicas share, each sweeps only the uploads it had begun.
            outbox = Outbox(db, owner=settings.instance if db.shared else "")
            await outbox.open()
            stack.push_async_callback(outbox.close)
            # The relay owns retries and their timing: the client tries once per call.
            client = RouterClient(
                settings.router_urls,
                token=settings.router_token,
                timeout_s=ROUTER_TIMEOUT_S,
                transport=router_transport,
                retries=0,
            )
            stack.push_async_callback(client.aclose)
            relay = outbox.relay(
                client,
                batch_max=settings.relay_batch_size,
                backoff_initial_s=settings.relay_backoff_initial_s,
                backoff_max_s=settings.relay_backoff_max_s,
                on_published=metrics.published.inc,
                on_failure=metrics.relay_failures.inc,
            )
            uploads = Uploads(store, outbox, settings, metrics, on_accepted=relay.wake)
            await uploads.sweep_spools()  # now, before serving: the database's part may have to wait (below)
            try:
                await uploads.sweep()
            except Unavailable as exc:  # the database is away: uploads answer 503 meanwhile, the sweep waits
                log.warning("cannot sweep interrupted uploads yet: %s", exc.detail)
                sweeping = asyncio.create_task(_sweep_once_back(uploads), name="sweep")
                stack.callback(sweeping.cancel)
            partials = Partials(settings.partials_dir, expiry_s=settings.resumable_expiry_s, clock=clock)
            await partials.open()
            stack.push_async_callback(partials.close)
            resumable = Resumable(partials, uploads, max_upload_bytes=settings.max_upload_bytes)
            await resumable.start_up()
            sweeper = ExpirySweeper(resumable, clock)
            resumable.on_change = sweeper.wake
            app.state.outbox = outbox
            app.state.uploads = uploads
            app.state.relay = relay
            app.state.resumable = resumable
            app.state.sweeper = sweeper

            def begin_shutdown() -> None:
                supervisor.begin_stop()
                relay.stop()
                blob_check.stop()
                sweeper.stop()

            app.state.begin_shutdown = begin_shutdown
            supervisor.start("blob-check", blob_check.run())
            supervisor.start("outbox-relay", relay.run())
            supervisor.start("resumable-expiry", sweeper.run())
            await blob_check.first_verdict()
            try:
                yield
            finally:
                begin_shutdown()
                await supervisor.drain(timeout_s=DRAIN_TIMEOUT_S)

    async def refresh_gauges() -> None:
        with contextlib.suppress(Unavailable):  # the last value stays while the database is away
            metrics.outbox_pending.set(await app.state.outbox.pending_count())

    app = FastAPIOffline(title="CatTube upload", description=DESCRIPTION, version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    install_problem_handlers(app)

    async def blob_readiness() -> str | None:
        check: BlobStoreCheck | None = getattr(app.state, "blob_check", None)  # made when the lifespan starts
        return "the service is starting" if check is None else await check.readiness()

    async def database_readiness() -> str | None:
        outbox: Outbox | None = getattr(app.state, "outbox", None)
        return "the service is starting" if outbox is None else await outbox.db.readiness()

    readiness: list[ReadinessCheck] = [supervisor.readiness, blob_readiness, database_readiness]
    app.include_router(ops_router(metrics.registry, readiness, before_scrape=refresh_gauges))
    app.include_router(api_router)
    app.include_router(tus_api.router)
    protect(app, ACCESS, settings)
    document_problems(app)
    # Uploads stream, bounded by max_upload_bytes (a tus PATCH by what is left of its upload).
    bound_request_bodies(app, settings, streaming=[("POST", "/videos"), *tus_api.STREAMING_ROUTES])
    # Added last, so outermost: a browser's preflight is answered before authentication is asked for.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins,
        allow_methods=["GET", "POST", "HEAD", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type", *tus_api.REQUEST_HEADERS],
        expose_headers=tus_api.RESPONSE_HEADERS,
    )
    return app


async def _sweep_once_back(uploads: Uploads) -> None:
    """Sweep as soon as the database answers again, trying with backoff (rows begun since start are left alone)."""
    failures = 0
    while True:
        failures += 1
        await asyncio.sleep(full_jitter(failures, 0.5, 30.0))
        try:
            await uploads.sweep()
            return
        except Unavailable as exc:
            log.debug("cannot sweep interrupted uploads yet: %s", exc.detail)
