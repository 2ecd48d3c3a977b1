"""The store in-process, with a fake router (an `httpx.MockTransport`) that hands out a secret and records publishes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from standardwebhooks.webhooks import Webhook

from router.client import new_event
from services.common.blobs import BlobStore, FileBlobStore, video_key
from services.store.app import create_app
from services.store.settings import StoreSettings
from tests.conftest import running

SECRET = "whsec_" + base64.b64encode(b"a store test secret, 32 bytes ok").decode()
PROBE = {"duration_s": 2.0, "width": 1280, "height": 720, "fps": 25.0, "video_codec": "h264", "rotation": 0}


@dataclass
class FakeRouter:
    """Answers PUT /subscriptions/* with a push secret and POST /events with 202; `status` makes it fail."""

    status: int = 202
    published: list[dict[str, Any]] = field(default_factory=list)
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    """Set on every publish request, refused or not."""
    authorizations: set[str | None] = field(default_factory=set)
    """Every Authorization header the store sent."""
    declared: asyncio.Event = field(default_factory=asyncio.Event)
    """Set on every PUT of a subscription, refused or not."""
    declare_status: int = 200
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Wakes the stats long polls (set by `delete`)."""

    def delete(self, name: str) -> None:
        """Delete a subscription as an operator would on the router: its long polls wake to a 404."""
        del self.subscriptions[name]
        self.changed.set()

    def handler(self, request: httpx.Request) -> Any:
        self.authorizations.add(request.headers.get("authorization"))
        if request.method == "PUT" and request.url.path.startswith("/subscriptions/"):
            self.declared.set()
            if self.declare_status != 200:
                return httpx.Response(self.declare_status, json={"title": "down", "detail": "the fake router says no"})
            body = json.loads(request.content)
            name = request.url.path.rsplit("/", 1)[1]
            self.subscriptions[name] = body
            return httpx.Response(200, json={"name": name, **body, "secret": SECRET})
        if request.method == "GET" and request.url.path.endswith("/stats"):
            return self._stats(request)
        if request.method == "POST" and request.url.path == "/events":
            self.attempts += 1
            self.arrived.set()
            if self.status != 202:
                return httpx.Response(self.status, json={"title": "down", "detail": "the fake router says no"})
            events = json.loads(request.content)
            start = len(self.published)
            self.published.extend(events)
            results = [{"id": e["id"], "sequence": start + i + 1, "duplicate": False} for i, e in enumerate(events)]
            return httpx.Response(202, json={"results": results})
        return httpx.Response(404, json={"title": "Not found"})

    async def _stats(self, request: httpx.Request) -> httpx.Response:
        name = request.url.path.split("/")[2]
        if name in self.subscriptions and "version" in request.url.params:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(float(request.url.params["wait_s"])):
                    await self.changed.wait()
        if name not in self.subscriptions:
            return httpx.Response(404, json={"title": "Not found", "detail": f"no subscription named {name!r}"})
        numbers = dict.fromkeys(("backlog", "in_flight", "delayed", "dead_lettered", "delivered_total"), 0)
        return httpx.Response(200, json={**numbers, "failed_total": 0, "oldest_age_s": 0.0, "version": 1})

    async def wait_for(self, done: Callable[[], bool], timeout_s: float = 5) -> None:
        """Wait (on publish requests, not a sleep loop) until `done()`."""
        async with asyncio.timeout(timeout_s):
            while not done():
                self.arrived.clear()
                await self.arrived.wait()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.published if e["type"] == kind]


@dataclass
class Store:
    api: httpx.AsyncClient
    app: FastAPI
    router: FakeRouter
    bucket: BlobStore

    async def deliver(self, event: dict[str, Any], *, secret: str = SECRET) -> httpx.Response:
        """POST `event` to /inbox signed as the router signs it."""
        return await self.api.post("/inbox", content=json.dumps(event), headers=signed(json.dumps(event), secret))

    async def published(self, kind: str, count: int = 1, timeout_s: float = 5) -> list[dict[str, Any]]:
        """Wait (on the fake router's publishes, not a sleep loop) until `count` events of `kind` went out."""
        await self.router.wait_for(lambda: len(self.router.of_type(kind)) >= count, timeout_s)
        return self.router.of_type(kind)


def signed(body: str, secret: str = SECRET, msg_id: str = "msg_1") -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "content-type": "application/cloudevents+json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
    }


def event(
    kind: str, data: dict[str, Any], *, id: str | None = None, source: str = "cattube/processing", **extra: Any
) -> dict[str, Any]:
    video_id = data.get("video_id")
    extra.setdefault("partitionkey", video_id if isinstance(video_id, str) else None)
    return new_event(kind, source, data, id=id, **extra)


def uploaded(video_id: str, bucket: BlobStore, title: str = "Whiskers on the beach") -> dict[str, Any]:
    master = {
        "uri": bucket.uri(video_key(video_id, "master.mp4")),
        "size_bytes": 10,
        "sha256": "0" * 64,
        "content_type": "video/mp4",
    }
    data = {"video_id": video_id, "title": title, "master": master, "probe": PROBE, "renditions": ["720p", "360p"]}
    return event("cattube.video.uploaded", data, id=video_id, source="cattube/upload")


def completed(
    video_id: str, bucket: BlobStore, names: tuple[str, ...] = ("720p", "360p"), *, hls_version: str | None = None
) -> dict[str, Any]:
    """`cattube.transcode.completed` as processing sends it; with `hls_version`, naming its HLS package."""
    renditions = [
        {"name": n, "uri": bucket.uri(video_key(video_id, f"{n}.mp4")), "width": 1280, "height": int(n[:-1]),
         "bitrate": 1_000_000, "size_bytes": 1000, "duration_s": 2.0}
        for n in names
    ]  # fmt: skip
    data = {"video_id": video_id, "renditions": renditions, "skipped": [], "elapsed_s": 1.5,
            "poster": {"uri": bucket.uri(video_key(video_id, "poster.jpg"))}}  # fmt: skip
    if hls_version is not None:
        data["hls"] = {"uri": bucket.uri(video_key(video_id, "hls", hls_version, "master.m3u8"))}
    return event("cattube.transcode.completed", data)


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., Any]:
    """`async with make_store(**settings) as store:` the app, its lifespan entered, subscribed to the fake router.

    `bucket` is the tests' own handle on the app's blob store (`blob_url`), the file store under DATA_DIR by default.
    """

    def make(fake: FakeRouter | None = None, bucket: BlobStore | None = None, **overrides: Any) -> Any:
        fake = fake or FakeRouter()
        settings = StoreSettings(
            data_dir=tmp_path / "data", router_url="http://router", store_public_url="http://store", **overrides
        )
        app = create_app(settings, exit_on_failure=False, router_transport=httpx.MockTransport(fake.handler))

        @asynccontextmanager
        async def store() -> AsyncIterator[Store]:
            async with running(app, base_url="http://store") as api:
                await app.state.feed.subscribed.wait()
                yield Store(api, app, fake, bucket or FileBlobStore(tmp_path / "data" / "bucket"))

        return store()

    return make
