"""A real uvicorn server in the test's own event loop, on a loopback socket bound before it starts."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import uvicorn


@asynccontextmanager
async def uvicorn_on_loopback(
    config_for: Callable[[int], uvicorn.Config], *, backlog: int = 16, force_exit: bool = False
) -> AsyncIterator[int]:
    """Serve `config_for(port)` and yield the port. The socket listens before the server starts, so clients
    can connect at once (the backlog holds them until it accepts); `force_exit` skips waiting for open
    connections on the way out."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    port: int = sock.getsockname()[1]
    server = uvicorn.Server(config_for(port))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield port
    finally:
        server.should_exit = True
        server.force_exit = force_exit
        await task
        sock.close()
