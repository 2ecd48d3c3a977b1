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


def serve(name: str, settings_type: type[S], create_app: Callable[[S], FastAPI], port_of: Callable[[S], int]) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {name}", description=f"Run the CatTube {name} service.")
    parser.add_argument("--host", help="interface to listen on (CATTUBE_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (the service's CATTUBE_*_PORT)")
    args = parser.parse_args()
    settings = settings_type()
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=args.host or settings.host,
        port=args.port or port_of(settings),
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    _Server(config, app).run()
