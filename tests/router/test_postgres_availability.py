"""A router on PostgreSQL whose database is away: at start, and cut off while it runs (through a TCP proxy
standing between them, refusing or dropping connections as an absent or restarting server does)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from router.app import create_app
from router.settings import RouterSettings
from tests.conftest import running
from tests.process import ServiceProcess, free_port
from tests.router.events import STRUCTURED, event
from tests.tcp_proxy import TcpProxy

QUEUE = {"pattern": None, "target": {"queue": {}}}


def through(url: str, port: int) -> str:
    """`url` with its port replaced by `port` (the proxy's)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    parts = urlsplit(database_url)
    p = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    yield p
    await p.stop()


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    return body


async def test_an_absent_database_at_start_is_retried_said_on_readyz_and_answered_with_503(
    tmp_path: Path, database_url: str, proxy: TcpProxy
) -> None:
    settings = RouterSettings(data_dir=tmp_path, router_database_url=through(database_url, proxy.port))
    app = create_app(settings, exit_on_failure=False)
    async with running(app) as router:  # the start does not fail: the proxy refuses every connection
        ready = assert_problem(await router.get("/readyz"), 503)
        assert f"127.0.0.1:{proxy.port}" in str(ready["detail"]) and "trying again" in str(ready["detail"])
        assert_problem(await router.post("/events", json=event(), headers=STRUCTURED), 503)
        assert_problem(await router.put("/subscriptions/q", json=QUEUE), 503)
        assert_problem(await router.get("/subscriptions"), 503)

        await proxy.start()  # the database is there now: the router finds it by itself
        await asyncio.wait_for(app.state.bus.store.connected.wait(), 30)
        assert (await router.get("/readyz")).status_code == 200
        assert (await router.put("/subscriptions/q", json=QUEUE)).status_code == 201
        assert (await router.post("/events", json=event(id="now"), headers=STRUCTURED)).status_code == 202
        (message,) = (await router.post("/subscriptions/q/receive", json={"max_messages": 10})).json()["messages"]
        assert message["event"]["id"] == "now"


async def test_a_database_cut_off_while_running_fails_requests_cleanly_and_is_recovered(
    tmp_path: Path, database_url: str, proxy: TcpProxy
) -> None:
    await proxy.start()
    settings = RouterSettings(data_dir=tmp_path, router_database_url=through(database_url, proxy.port))
    app = create_app(settings, exit_on_failure=False)
    acknowledged: list[str] = []
    async with running(app) as router:
        assert (await router.put("/subscriptions/q", json=QUEUE)).status_code == 201
        for i in range(5):
            assert (await router.post("/events", json=event(id=f"before{i}"), headers=STRUCTURED)).status_code == 202
            acknowledged.append(f"before{i}")

        await proxy.cut()  # every session dropped at once, as a restart of the server does
        answers = await asyncio.gather(
            *[router.post("/events", json=event(id=f"during{i}"), headers=STRUCTURED) for i in range(5)]
        )
        for i, answer in enumerate(answers):
            if answer.status_code == 202:
                acknowledged.append(f"during{i}")
            else:
                assert_problem(answer, 503)

        # The next requests find fresh sessions: nothing was restarted by hand.
        assert (await router.post("/events", json=event(id="after"), headers=STRUCTURED)).status_code == 202
        acknowledged.append("after")
        assert (await router.get("/readyz")).status_code == 200
        received = (await router.post("/subscriptions/q/receive", json={"max_messages": 10})).json()["messages"]
        received += (await router.post("/subscriptions/q/receive", json={"max_messages": 10})).json()["messages"]
        assert set(acknowledged) <= {m["event"]["id"] for m in received}


@pytest.mark.slow
async def test_the_process_keeps_serving_503s_while_its_database_is_away(tmp_path: Path) -> None:
    """No crash loop: the router process stays up, says why on /readyz, and answers requests with problems."""
    port = free_port()  # nothing listens there
    env = {
        "CATTUBE_DATA_DIR": str(tmp_path),
        "CATTUBE_ROUTER_DATABASE_URL": f"postgresql://cattube:secret@127.0.0.1:{port}/cattube",
        "PATH": os.environ.get("PATH", ""),
    }
    router = ServiceProcess("router", free_port(), env)
    await router.start()
    try:
        async with httpx.AsyncClient(base_url=router.url) as client:
            ready = assert_problem(await client.get("/readyz"), 503)
            assert f"127.0.0.1:{port}/cattube" in str(ready["detail"]) and "secret" not in str(ready["detail"])
            assert_problem(await client.post("/events", json=event(), headers=STRUCTURED), 503)
        assert router.proc is not None and router.proc.returncode is None
    finally:
        # uvicorn re-raises the signal after a graceful shutdown, so the exit status is -SIGTERM.
        assert await router.stop() in (0, -signal.SIGTERM)
    assert any("Application shutdown complete" in line for line in router.log)


async def test_a_database_that_refuses_the_router_is_named_on_readyz(tmp_path: Path, postgres_url: str) -> None:
    missing = urlunsplit(urlsplit(postgres_url)._replace(path="/no_such_database"))
    app = create_app(RouterSettings(data_dir=tmp_path, router_database_url=missing), exit_on_failure=False)
    async with running(app) as router:
        ready = assert_problem(await router.get("/readyz"), 503)
        assert "no_such_database" in str(ready["detail"]) and "does not exist" in str(ready["detail"])
        assert_problem(await router.get("/subscriptions"), 503)
