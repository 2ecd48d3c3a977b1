"""Fixtures shared by every test: in-process apps with their lifespan entered, and real processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Generator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from router.app import create_app as create_router
from router.settings import RouterSettings
from tests.postgres import PostgresServer, PostgresUnavailable, fresh_database, postgres_server
from tests.process import STARTED
from tests.s3 import S3Server, S3Unavailable, fresh_bucket, s3_server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--router-engine",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="The store the router tests run the router on (tests/router/conftest.py).",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test shows the logs of the service processes it started, and of the session's S3 server if it
    used it (a CI failure is read from its output)."""
    report = yield
    if report.failed:
        for proc in STARTED:
            report.sections.append((f"log of {proc.module} on port {proc.port}", proc.log_tail()))
        server = getattr(item, "funcargs", {}).get("s3")
        if isinstance(server, S3Server) and server.log is not None:
            report.sections.append((f"log of the S3 server at {server.endpoint} (last lines)", server.log_tail()))
    if call.when == "teardown":  # a process a wider fixture keeps running stays on the list
        STARTED[:] = [proc for proc in STARTED if proc.proc is not None]
    return report


@asynccontextmanager
async def running(app: FastAPI, base_url: str = "http://testserver") -> AsyncIterator[httpx.AsyncClient]:
    """Enter the app's lifespan and hand back a client talking to it in-process."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as client:
            yield client


@pytest.fixture
def router_settings(tmp_path: Path) -> Callable[..., RouterSettings]:
    def make(**overrides: Any) -> RouterSettings:
        return RouterSettings(data_dir=tmp_path / "data", **overrides)

    return make


@pytest.fixture
async def router_app(router_settings: Callable[..., RouterSettings]) -> AsyncIterator[FastAPI]:
    app = create_router(router_settings(), exit_on_failure=False)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def router(router_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to an in-process router with a fresh bus."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router_app), base_url="http://router") as client:
        yield client


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL for the whole session: ours (tests/postgres.py), or CATTUBE_TEST_DATABASE_URL's."""
    try:
        with postgres_server() as server:
            yield server
    except PostgresUnavailable as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def postgres_url(postgres: PostgresServer) -> str:
    """The session server's maintenance database, as a superuser URL."""
    return postgres.url


@pytest.fixture
async def database_url(postgres_url: str) -> AsyncIterator[str]:
    """A database of this test's own, created empty and dropped afterwards."""
    async with fresh_database(postgres_url) as url:
        yield url


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """One S3 server for the whole session: a SeaweedFS of ours (tests/s3.py), or CATTUBE_TEST_S3_ENDPOINT's."""
    try:
        with s3_server() as server:
            yield server
    except S3Unavailable as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `AWS_*` variables services read (through obstore), set for the session's S3 server as the app's identity."""
    for variable, value in s3.environment().items():
        monkeypatch.setenv(variable, value)


@pytest.fixture
async def s3_url(s3: S3Server, s3_env: None) -> AsyncIterator[str]:
    """`s3://<fresh bucket>/media`, reachable by the app through the `AWS_*` variables."""
    async with fresh_bucket(s3) as bucket:
        yield f"s3://{bucket}/media"
