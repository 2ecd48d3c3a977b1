"""A server-side copy answers only once the server has copied every byte: it is given longer than other requests.

A proxy in front of the session's SeaweedFS holds back the answer to every CopyObject (a PUT with
`x-amz-copy-source`) by `COPY_DELAY_S`, as a server copying gigabytes does, while the store's other
requests must answer within `REQUEST_TIMEOUT_S`, shorter than that.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta

import aiohttp
import pytest
from aiohttp import web

from services.common.errors import Unavailable
from services.common.s3_blobs import S3BlobStore
from tests.s3 import CLIENT, S3Server, fresh_bucket

REQUEST_TIMEOUT_S = 1.0
COPY_DELAY_S = 3 * REQUEST_TIMEOUT_S
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


@pytest.fixture
async def slow_copies(s3: S3Server) -> AsyncIterator[str]:
    """The endpoint of a proxy to `s3` that answers copies `COPY_DELAY_S` late (headers kept: signatures hold)."""
    async with aiohttp.ClientSession(auto_decompress=False) as upstream:

        async def forward(request: web.Request) -> web.Response:
            headers = {name: value for name, value in request.headers.items() if name.lower() not in HOP_BY_HOP}
            async with upstream.request(
                request.method, s3.endpoint + request.rel_url.raw_path_qs, headers=headers, data=await request.read()
            ) as answer:
                body = await answer.read()
            if request.method == "PUT" and "x-amz-copy-source" in request.headers:
                await asyncio.sleep(COPY_DELAY_S)  # the copy is done; its answer comes as late as a long copy's
            kept = {name: value for name, value in answer.headers.items() if name.lower() not in HOP_BY_HOP}
            if request.method == "HEAD":  # no body, but the object's length, which the client reads
                kept["Content-Length"] = answer.headers.get("Content-Length", "0")
                return web.Response(status=answer.status, headers=kept)
            return web.Response(status=answer.status, headers=kept, body=body)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_a_copy_may_take_longer_than_other_requests(s3: S3Server, slow_copies: str) -> None:
    async with fresh_bucket(s3) as bucket:
        config = {**s3.config(), "endpoint": slow_copies}
        options = {**CLIENT, "timeout": timedelta(seconds=REQUEST_TIMEOUT_S)}
        store = S3BlobStore(f"s3://{bucket}/media", config=config, client_options=options)  # type: ignore[arg-type]
        await store.write("videos/v1/incoming", chunks(b"whiskers"))
        copied = await store.copy("videos/v1/incoming", "videos/v1/master.mp4")
        assert copied.sha256 == hashlib.sha256(b"whiskers").hexdigest()
        assert await store.list("videos/v1/") == ["videos/v1/incoming", "videos/v1/master.mp4"]


async def test_the_proxy_holds_copies_back_past_the_request_timeout(s3: S3Server, slow_copies: str) -> None:
    """What makes the test above mean something: the same delay fails an ordinary request."""
    async with fresh_bucket(s3) as bucket:
        config = {**s3.config(), "endpoint": slow_copies}
        options = {**CLIENT, "timeout": timedelta(seconds=REQUEST_TIMEOUT_S)}
        store = S3BlobStore(f"s3://{bucket}/media", config=config, client_options=options)  # type: ignore[arg-type]
        await store.write("videos/v1/incoming", chunks(b"whiskers"))
        with pytest.raises(Unavailable, match="could not copy"):
            store._copier = store.store  # copies through the ordinary client, as before COPY_TIMEOUT
            await store.copy("videos/v1/incoming", "videos/v1/master.mp4")
