"""Fixtures for the upload service: settings with fast retries, its bucket, and the app in-process (router down)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.upload.app import create_app
from services.upload.settings import UploadSettings
from tests.conftest import running
from tests.media import make_clip

# Nothing listens on the discard port: the relay finds the router down at once.
DEAD_ROUTER = "http://127.0.0.1:9"


@pytest.fixture
def upload_settings(tmp_path: Path) -> Callable[..., UploadSettings]:
    def make(**overrides: Any) -> UploadSettings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "upload",
            "router_url": DEAD_ROUTER,
            "relay_backoff_initial_s": 0.05,
            "relay_backoff_max_s": 0.2,
            **overrides,
        }
        return UploadSettings(**values)

    return make


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_clip(tmp_path_factory.mktemp("clips") / "cat.mp4", 160, 96, 0.5).read_bytes()


@pytest.fixture
def bucket(tmp_path: Path) -> Path:
    return tmp_path / "upload" / "bucket"


@pytest.fixture
async def upload(upload_settings: Callable[..., UploadSettings]) -> AsyncIterator[httpx.AsyncClient]:
    """The upload service in-process, with the router down."""
    async with running(create_app(upload_settings(), exit_on_failure=False)) as client:
        yield client
