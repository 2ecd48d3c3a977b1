"""`cattube upload FILE`: send a video to the upload service, with a progress bar; `--wait` follows
it through processing on the store's live stream until it is ready or has failed."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import httpx

from services.cli.progress import Bar, line
from services.cli.tokens import user_token
from services.common.settings import CommonSettings


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("upload", help="upload a video file", description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--title", help="default: the file's name")
    parser.add_argument("--renditions", help="comma-separated, e.g. 1080p,720p (default: the upload service's)")
    parser.add_argument("--wait", action="store_true", help="follow it until it is ready or has failed")


class _Counting:
    """A file whose reads move a progress bar (httpx streams multipart bodies by reading files)."""

    def __init__(self, file: IO[bytes], bar: Bar) -> None:
        self.file = file
        self.bar = bar
        self.sent = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.file.read(size)
        self.sent += len(chunk)
        self.bar.show(self.sent)
        return chunk


def urls(settings: CommonSettings) -> tuple[str, str]:
    return f"http://127.0.0.1:{settings.upload_port}", f"http://127.0.0.1:{settings.store_port}"


async def upload_file(
    settings: CommonSettings, path: Path, *, title: str | None = None, renditions: str | None = None
) -> str:
    """Upload one file; returns its video id. Raises SystemExit with the service's reason if refused."""
    upload_url, _ = urls(settings)
    token = user_token(settings)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    form = {"title": title or path.stem}
    if renditions:
        form["renditions"] = renditions
    size = (await asyncio.to_thread(path.stat)).st_size
    bar = Bar(f"uploading {path.name}", size)
    with path.open("rb") as file:
        files = {"file": (path.name, _Counting(file, bar), "application/octet-stream")}
        async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
            response = await client.post(f"{upload_url}/videos", data=form, files=files, headers=headers)  # type: ignore[arg-type]
    if response.status_code != 202:
        problem = response.json() if response.headers.get("content-type", "").endswith("json") else {}
        raise SystemExit(f"{path.name}: refused ({response.status_code}): {problem.get('detail', response.text)}")
    video_id: str = response.json()["video_id"]
    bar.done(video_id)
    return video_id


async def live_changes(store_url: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The store's server-sent events as (event, data) pairs, from `ready` on."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10)) as client:
        async with client.stream("GET", f"{store_url}/events") as response:
            event, data = "message", ""
            async for raw in response.aiter_lines():
                if raw.startswith("event:"):
                    event = raw[6:].strip()
                elif raw.startswith("data:"):
                    data += raw[5:].strip()
                elif raw == "" and data:
                    yield event, json.loads(data)
                    event, data = "message", ""


async def run(settings: CommonSettings, args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise SystemExit(f"{args.file}: no such file")
    _, store_url = urls(settings)
    if not args.wait:
        video_id = await upload_file(settings, args.file, title=args.title, renditions=args.renditions)
        line(f"{video_id}: uploaded; watch it at {store_url}/")
        return 0
    changes = live_changes(store_url)
    await anext(changes)  # listening before the upload: no change can be missed
    video_id = await upload_file(settings, args.file, title=args.title, renditions=args.renditions)
    bar = Bar(f"processing {args.file.name}")
    async for event, video in changes:
        if event != "video" or video.get("video_id") != video_id:
            continue
        status = video.get("status")
        bar.show(float(video.get("progress") or 0), status or "")
        if status in ("ready", "failed", "deleted"):
            bar.done(status)
            for rendition in video.get("renditions", []):
                line(f"  {rendition['name']:>6} {rendition['width']}x{rendition['height']}  {rendition['url']}")
            if video.get("error"):
                line(f"  error: {video['error']}")
            return 0 if status == "ready" else 1
    return 1
