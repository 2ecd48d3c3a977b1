"""Store replicas on one PostgreSQL catalog: a page on either replica hears every change, wherever it was applied."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvicorn
from fastapi import FastAPI

from services.common.blobs import FileBlobStore
from services.store.app import create_app
from services.store.live import Change
from services.store.settings import StoreSettings
from tests.conftest import running
from tests.services.store.conftest import FakeRouter, event, signed, uploaded
from tests.services.store.test_live import sse


def replica(tmp_path: Path, name: str, database_url: str) -> FastAPI:
    settings = StoreSettings(
        data_dir=tmp_path / name,
        blob_url=(tmp_path / "bucket").as_uri(),
        router_url="http://router",
        store_public_url="http://store",
        database_url=database_url,
    )
    return create_app(settings, exit_on_failure=False, router_transport=httpx.MockTransport(FakeRouter().handler))


@asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[str]:
    """`app` behind uvicorn on a loopback port (a server-sent event stream needs a real socket)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await serving
        sock.close()


async def deliver(api: httpx.AsyncClient, e: dict[str, Any]) -> None:
    body = json.dumps(e)
    assert (await api.post("/inbox", content=body, headers=signed(body))).status_code == 204


async def test_a_change_applied_on_one_replica_reaches_a_page_on_the_other(tmp_path: Path, database_url: str) -> None:
    a, b = replica(tmp_path, "a", database_url), replica(tmp_path, "b", database_url)
    bucket = FileBlobStore(tmp_path / "bucket")
    async with running(a, base_url="http://store") as on_a, served(b) as b_url:
        async with asyncio.timeout(10):
            await a.state.feed.subscribed.wait()
            await b.state.peers.listening.wait()
        async with httpx.AsyncClient(base_url=b_url) as page, page.stream("GET", "/events") as stream:
            events = sse(stream.aiter_lines())
            async with asyncio.timeout(10):
                assert await anext(events) == ("ready", {})
                await deliver(on_a, uploaded("v1", bucket))
                kind, video = await anext(events)
                assert (kind, video["video_id"], video["status"]) == ("video", "v1", "uploaded")
                await deliver(on_a, event("cattube.transcode.progress", {"video_id": "v1", "percent": 42.0}))
                kind, video = await anext(events)
                assert (video["status"], video["progress"]) == ("processing", 42.0)
                data = {"from": 0, "to": 2, "backlog": 2, "in_flight": 0, "reason": "2 jobs"}
                await deliver(on_a, event("cattube.processing.scaled", data))
                kind, point = await anext(events)
                assert (kind, point["to"]) == ("scaled", 2)
            # Both replicas read the one catalog.
            listed = (await page.get("/videos")).json()["items"]
            assert [v["video_id"] for v in listed] == ["v1"]


async def test_a_lost_listening_connection_comes_back_and_open_pages_reload(tmp_path: Path, database_url: str) -> None:
    a, b = replica(tmp_path, "a", database_url), replica(tmp_path, "b", database_url)
    bucket = FileBlobStore(tmp_path / "bucket")
    async with running(a, base_url="http://store") as on_a, running(b, base_url="http://store"):
        async with asyncio.timeout(10):
            await a.state.feed.subscribed.wait()
            await b.state.peers.listening.wait()
        async with b.state.live.listen() as before:
            await deliver(on_a, uploaded("v1", bucket))
            async with asyncio.timeout(10):
                change = await before.get()
            assert isinstance(change, Change) and change.video is not None and change.video.video_id == "v1"
            # Cut b's listening connection, as a restarted server or a broken link would. Cleared first: b may
            # be listening again before the admin connection below has even closed.
            b.state.peers.listening.clear()
            admin = await asyncpg.connect(database_url)
            try:
                cut = await admin.fetchval(
                    "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                    f"{b.state.catalog.db.origin}-listen",
                )
            finally:
                await admin.close()
            assert cut == 1
            async with asyncio.timeout(30):
                assert await before.get() is None  # the stream ends: what was said meanwhile may be lost
                await b.state.peers.listening.wait()
        async with b.state.live.listen() as after:  # the browser reconnects (and reloads its lists)
            await deliver(on_a, event("cattube.transcode.progress", {"video_id": "v1", "percent": 10.0}))
            async with asyncio.timeout(10):
                change = await after.get()
            assert change is not None and change.video is not None and change.video.progress == 10.0
