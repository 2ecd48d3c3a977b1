"""`/docs` works with no network: every script, stylesheet and icon the page loads is served by the
service itself (FastAPI's default page loads Swagger UI from a CDN, and is blank offline)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from router.app import create_app as create_router
from router.settings import RouterSettings
from services.processing.app import create_app as create_processing
from services.processing.settings import ProcessingSettings
from services.store.app import create_app as create_store
from services.store.settings import StoreSettings
from services.upload.app import create_app as create_upload
from services.upload.settings import UploadSettings

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|(?:url|openapi)\s*:\s*["']([^"']+)["']""")

APPS: dict[str, Callable[[Path], FastAPI]] = {
    "router": lambda d: create_router(RouterSettings(data_dir=d, token="t")),
    "upload": lambda d: create_upload(UploadSettings(data_dir=d, token="t")),
    "processing": lambda d: create_processing(ProcessingSettings(data_dir=d, token="t")),
    "store": lambda d: create_store(StoreSettings(data_dir=d, token="t")),
}


@pytest.mark.parametrize("name", APPS)
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_load_nothing_from_elsewhere(name: str, page: str, tmp_path: Path) -> None:
    app = APPS[name](tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as client:
        html = await client.get(page)
        assert html.status_code == 200, f"{page} needs no token"
        urls = [a or b for a, b in ASSET.findall(html.text)]
        assert urls, "the page names its assets"
        for url in urls:
            assert url.startswith("/"), f"{name}{page} loads {url} from another host"
            if url.endswith(".json"):
                continue  # the OpenAPI document itself: needs the app's lifespan, tested elsewhere
            asset = await client.get(url)
            assert asset.status_code == 200, f"{url} is served without a token"
            assert asset.content
