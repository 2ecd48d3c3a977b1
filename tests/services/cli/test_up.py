"""`cattube up` as a real process: ports checked before anything starts, the page URL only once
every service serves, and Ctrl-C stopping the services one by one with the router last."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.cli.stack import STOP_ORDER
from tests.e2e.stack import Stack
from tests.process import REPO, free_port

pytestmark = pytest.mark.slow
SERVICES_IN_STOP_ORDER = ("upload", "store", "processing", "router")


async def test_a_taken_port_is_named_with_its_variable_and_nothing_starts(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("router", "upload", "processing")}
    env = {**os.environ, **{f"CATTUBE_{name.upper()}_PORT": str(port) for name, port in ports.items()}}
    env["CATTUBE_DATA_DIR"] = str(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env["CATTUBE_STORE_PORT"] = str(taken.getsockname()[1])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "up",
            cwd=REPO, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode not in (0, None)
    assert "CATTUBE_STORE_PORT" in err.decode() and env["CATTUBE_STORE_PORT"] in err.decode(), err
    assert len(err.decode().strip().splitlines()) <= 2, err
    assert b"Open the page" not in out and b"Uvicorn running" not in out, out


async def test_a_service_that_keeps_dying_at_start_ends_it_with_a_clear_line(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "data", CATTUBE_BLOB_URL="s3://Not_A_Bucket")  # the router starts; the others refuse it
    stack.proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "up",
        cwd=REPO, env=stack.env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(stack.proc.communicate(), 60)
    assert stack.proc.returncode == 1
    assert "exited 2 times while starting" in err.decode() and len(err.decode().strip().splitlines()) == 1, err
    assert b"Open the page" not in out


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path / "data")
    await stack.start()
    try:
        yield stack
    finally:
        await stack.stop()


def steps(stack: Stack) -> list[str]:
    return [line for line in stack.log if line.startswith("CatTube: ")]


async def test_the_page_is_shown_once_every_service_serves(stack: Stack) -> None:
    page = await stack.wait_line("Open the page: ")
    serving = [i for i, line in enumerate(stack.log) if "Uvicorn running on" in line]
    assert len(serving) == 4 and max(serving) < page


async def test_ctrl_c_stops_the_services_in_order_with_the_router_last(stack: Stack) -> None:
    assert stack.proc is not None
    stack.proc.send_signal(signal.SIGINT)
    code = await asyncio.wait_for(stack.proc.wait(), 4 * 5 + 10)  # each service has 5 s
    assert code == 0
    await stack.stop()
    assert [line for line in steps(stack) if line.startswith("CatTube: stopping ") or line.endswith(" stopped")] == [
        line for name in SERVICES_IN_STOP_ORDER for line in (f"CatTube: stopping {name}", f"CatTube: {name} stopped")
    ], stack.log[-40:]
    assert STOP_ORDER == (*SERVICES_IN_STOP_ORDER, "s3")  # a cluster's bucket goes last


async def test_a_second_ctrl_c_kills_every_service_at_once(stack: Stack) -> None:
    assert stack.proc is not None
    pids = {name: stack.pid_of(name) for name in SERVICES_IN_STOP_ORDER}
    os.kill(pids["upload"], signal.SIGSTOP)  # a service that will not stop: the first Ctrl-C waits on it
    stack.proc.send_signal(signal.SIGINT)
    await stack.wait_line("CatTube: stopping upload")
    stack.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(stack.proc.wait(), 10) == 130
    await stack.stop()
    assert "CatTube: killing every service now" in steps(stack)
    assert not any("did not stop within" in line for line in steps(stack)), steps(stack)
    for pid in pids.values():  # reaped by `cattube up` before it exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
