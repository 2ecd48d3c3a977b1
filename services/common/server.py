"""Run one service under uvicorn: the shared body of every `python -m <service>`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI

from services.common.connections import ConnectionLimits, protocol_with
from services.common.settings import CommonSettings

S = TypeVar("S", bound=CommonSettings)
log = logging.getLogger(__name__)

FILES_BESIDE_CONNECTIONS = 256
"""Open files a service needs besides its clients' connections: databases, its own client connections, blobs."""


class _Server(uvicorn.Server):
    """uvicorn, plus: on SIGTERM/SIGINT the app's `begin_shutdown` runs at once, so long polls
    return and background loops stop taking work before uvicorn waits for open requests."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        begin_shutdown = getattr(self.app.state, "begin_shutdown", None)
        if begin_shutdown is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(begin_shutdown)


def serve(name: str, settings_type: type[S], create_app: Callable[[S], FastAPI], port_field: str) -> None:
    """Parse `--host/--port`, read the settings from the environment, and run the app under uvicorn.

    `--port` is written into the settings (as `port_field`) rather than only handed to uvicorn: a
    service tells others where it listens (the store's push URL is built from it).
    """
    parser = argparse.ArgumentParser(prog=f"python -m {name}", description=f"Run the CatTube {name} service.")
    parser.add_argument("--host", help="interface to listen on (CATTUBE_HOST)")
    parser.add_argument("--port", type=int, help=f"port to listen on (CATTUBE_{port_field.upper()})")
    args = parser.parse_args()
    overrides: dict[str, object] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides[port_field] = args.port
    settings = settings_type(**overrides)  # type: ignore[arg-type]
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s"
    )
    # Services hold long polls on the router: httpx would log every one of them at INFO.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    app = create_app(settings)
    _Server(uvicorn_config(app, settings, port=getattr(settings, port_field)), app).run()


def uvicorn_config(app: FastAPI, settings: CommonSettings, port: int, **extra: Any) -> uvicorn.Config:
    """uvicorn's configuration of a service: `server_options`, and `extra` (tests: `lifespan="off"`)."""
    config = uvicorn.Config(app, **server_options(settings, port=port), **extra)
    # An app that applies the proxy headers itself, to the requests that read them (the router: not its hot
    # routes), takes uvicorn's setting (FORWARDED_ALLOW_IPS, else 127.0.0.1), and uvicorn leaves its own out.
    take_proxy_headers = getattr(app, "serve_proxy_headers", None)
    if config.proxy_headers and take_proxy_headers is not None and take_proxy_headers(config.forwarded_allow_ips):
        config.proxy_headers = False
    return config


def server_options(settings: CommonSettings, port: int) -> dict[str, Any]:
    """uvicorn's options for a service: httptools with the connection limits of `connections.py`."""
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=connection_cap(settings.max_connections),
    )
    return {
        "host": settings.host,
        "port": port,
        "http": protocol_with(limits),
        "log_level": settings.log_level,
        "access_log": False,
        "server_header": False,  # `Server: uvicorn` on every answer told clients nothing they need
        "timeout_graceful_shutdown": 30,
    }


def connection_cap(wanted: int) -> int:
    """Raise the open-file limit to what `wanted` connections need, as far as the hard limit allows, and
    return the cap that fits: past the file limit accept() fails and every client waits, 503 or not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + FILES_BESIDE_CONNECTIONS
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    cap = max(1, soft - FILES_BESIDE_CONNECTIONS)
    log.warning("open-file limit %d: serving at most %d connections, not %d", soft, cap, wanted)
    return cap
