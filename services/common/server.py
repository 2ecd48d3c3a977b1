"""Run one service under uvicorn: the shared body of every `python -m <service>`."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

import uvicorn
from fastapi import FastAPI

from services.common.settings import CommonSettings

S = TypeVar("S", bound=CommonSettings)


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
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=getattr(settings, port_field),
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    _Server(config, app).run()
