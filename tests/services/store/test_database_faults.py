"""The store on PostgreSQL when the server goes away: 503 problem+json, /readyz says why, and it recovers by itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from services.common.blobs import FileBlobStore
from services.store.app import create_app
from services.store.settings import StoreSettings
from tests.conftest import running
from tests.services.store.conftest import FakeRouter, event, signed, uploaded
from tests.stoppable_postgres import stoppable_postgres


def store_on(tmp_path: Path, database_url: str) -> FastAPI:
    settings = StoreSettings(
        data_dir=tmp_path / "data",
        router_url="http://router",
        store_public_url="http://store",
        database_url=database_url,
    )
    return create_app(settings, exit_on_failure=False, router_transport=httpx.MockTransport(FakeRouter().handler))


async def deliver(api: httpx.AsyncClient, e: dict[str, Any]) -> httpx.Response:
    body = json.dumps(e)
    return await api.post("/inbox", content=body, headers=signed(body))


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "catalog database" in response.json()["detail"] and "cannot be reached" in response.json()["detail"]
    assert ":***@" in response.json()["detail"]  # the URL is named, its password is not


async def test_the_server_stopped_under_a_running_store_and_started_again(tmp_path: Path) -> None:
    bucket = FileBlobStore(tmp_path / "data" / "bucket")
    async with stoppable_postgres() as server:
        app = store_on(tmp_path, server.url)
        async with running(app, base_url="http://store") as api:
            await app.state.feed.subscribed.wait()
            assert (await deliver(api, uploaded("v1", bucket))).status_code == 204

            await server.stop()
            assert_unavailable(await api.get("/videos"))
            assert_unavailable(await api.get("/videos/v1"))
            assert_unavailable(
                await deliver(api, event("cattube.transcode.progress", {"video_id": "v1", "percent": 5}))
            )
            ready = await api.get("/readyz")
            assert ready.status_code == 503 and "catalog database" in ready.json()["detail"]
            assert "stopped" not in ready.json()["detail"]  # no background loop died over it

            await server.start()
            app.state.peers.listening.clear()
            assert (await api.get("/videos/v1")).json()["status"] == "uploaded"  # at once, no failed request first
            assert (await api.get("/readyz")).status_code == 200
            progress = event("cattube.transcode.progress", {"video_id": "v1", "percent": 5})
            assert (await deliver(api, progress)).status_code == 204  # the router's retry now lands
            assert (await api.get("/videos/v1")).json()["progress"] == 5
            async with asyncio.timeout(30):
                await app.state.peers.listening.wait()  # hearing other replicas again too


async def test_a_store_that_starts_before_its_server_answers_503_until_it_is_there(tmp_path: Path) -> None:
    bucket = FileBlobStore(tmp_path / "data" / "bucket")
    async with stoppable_postgres() as server:
        await server.stop()
        app = store_on(tmp_path, server.url)
        async with running(app, base_url="http://store") as api:  # it starts: no crash, no crash loop
            await app.state.feed.subscribed.wait()
            assert_unavailable(await api.get("/videos"))
            ready = await api.get("/readyz")
            assert ready.status_code == 503 and "catalog database" in ready.json()["detail"]

            await server.start()  # the schema is made by the first transaction that finds the server
            assert (await api.get("/videos")).json()["items"] == []
            assert (await deliver(api, uploaded("v1", bucket))).status_code == 204
            assert (await api.get("/videos/v1")).json()["status"] == "uploaded"
            assert (await api.get("/readyz")).status_code == 200
