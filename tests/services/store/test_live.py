"""GET /events over a real socket (a server-sent event stream needs one), and the fan-out behind it."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from services.common.blobs import FileBlobStore
from services.store.app import create_app
from services.store.live import Change, Live
from services.store.records import Video
from services.store.settings import StoreSettings
from tests.services.store.conftest import FakeRouter, event, signed, uploaded


async def sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, Any]]:
    """(event name, parsed data) for each event of a text/event-stream."""
    name, data = "message", ""
    async for line in lines:
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data:
            yield name, json.loads(data)
            name, data = "message", ""


async def test_a_page_hears_changes_as_they_happen_and_the_stream_ends_at_shutdown(tmp_path: Path) -> None:
    settings = StoreSettings(data_dir=tmp_path / "data", router_url="http://router", store_public_url="http://store")
    app = create_app(settings, exit_on_failure=False, router_transport=httpx.MockTransport(FakeRouter().handler))
    # Listening before the server starts: a client that connects early waits in the backlog, no polling needed.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            await app.state.feed.subscribed.wait()
            bucket = FileBlobStore(tmp_path / "data" / "bucket")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                async with client.stream("GET", "/events") as stream:
                    assert stream.headers["content-type"].startswith("text/event-stream")
                    events = sse(stream.aiter_lines())
                    assert await anext(events) == ("ready", {})

                    async def deliver(e: dict[str, Any]) -> None:
                        body = json.dumps(e)
                        assert (await client.post("/inbox", content=body, headers=signed(body))).status_code == 204

                    await deliver(uploaded("v1", bucket))
                    kind, video = await anext(events)
                    assert (kind, video["video_id"], video["status"]) == ("video", "v1", "uploaded")
                    assert video["version"] == 1
                    await deliver(event("cattube.transcode.progress", {"video_id": "v1", "percent": 42.0}))
                    kind, video = await anext(events)
                    assert (video["status"], video["progress"], video["version"]) == ("processing", 42.0, 2)
                    data = {"from": 0, "to": 1, "backlog": 1, "in_flight": 0, "reason": "1 job", "instance": "m"}
                    await deliver(event("cattube.processing.scaled", data))
                    await deliver(event("cattube.processing.scaled", {**data, "to": 2, "instance": "w"}))
                    for instance, to, fleet in (("m", 1, 1), ("w", 2, 3)):
                        kind, point = await anext(events)
                        assert (kind, point["instance"], point["to"], point["fleet"]) == ("scaled", instance, to, fleet)

                    app.state.begin_shutdown()  # what SIGTERM does: open streams end, so shutdown is not held up
                    assert [item async for item in events] == []
    finally:
        server.should_exit = True
        await serving
        sock.close()


async def test_a_listener_that_falls_behind_is_dropped_not_waited_for() -> None:
    live = Live(queue_size=2)
    async with live.listen() as slow, live.listen() as fast:
        for n in range(3):
            live.publish(Change("video", video=Video(f"v{n}")))
            item = fast.get_nowait()
            assert item is not None and item.video is not None and item.video.video_id == f"v{n}"
        assert slow.get_nowait() is None  # its stream ends; the page reconnects and reloads
        assert live.listeners == 1 and live.dropped_total == 1
    assert live.listeners == 0
