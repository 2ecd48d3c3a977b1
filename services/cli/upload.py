"""`cattube upload FILE`: send a video to the upload service, with a progress bar; `--wait` follows
it through processing on the store's live stream until it is ready or has failed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import IO, Any

import httpx

from services.cli.failure import Failure
from services.cli.progress import Bar, line, phase
from services.cli.tokens import user_token
from services.common.contract import RENDITION_NAMES  # checked here before a byte is sent
from services.common.settings import CommonSettings


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("upload", help="upload a video file", description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--title", help="default: the file's name")
    parser.add_argument(
        "--renditions", help=f"comma-separated, out of {','.join(RENDITION_NAMES)} (default: the upload service's)"
    )
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


def check_renditions(raw: str) -> str:
    """The names as the service wants them, or a Failure naming the first unknown one."""
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in RENDITION_NAMES]
    if unknown or not names:
        got = f"unknown rendition {unknown[0]!r}" if unknown else "no rendition given"
        raise Failure(f"--renditions: {got}; use comma-separated names out of {', '.join(RENDITION_NAMES)}")
    return ",".join(names)


def open_video(path: Path) -> IO[bytes]:
    """The file opened for reading, or a Failure saying why it cannot be."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise Failure(f"{path}: no such file") from None
    except IsADirectoryError:
        raise Failure(f"{path}: is a directory, not a video file") from None
    except OSError as exc:
        raise Failure(f"{path}: cannot be read ({exc.strerror or exc})") from None


def unreachable(what: str, url: str, exc: httpx.TransportError) -> Failure:
    """A transport error as a person reads it: what could not be reached, and what to run."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return Failure(f"the {what} at {url} is not reachable; is the stack running? Start it with `cattube up`.")
    if isinstance(exc, httpx.TimeoutException):
        return Failure(f"the {what} at {url} did not answer in time")
    return Failure(f"the {what} at {url} broke off the connection ({exc or type(exc).__name__})")


def refusal(response: httpx.Response) -> str:
    """A refusal in one line: the problem's title and detail (RFC 9457), or the start of the body."""
    problem: Any = None
    with contextlib.suppress(ValueError):
        problem = response.json()
    if isinstance(problem, dict) and ("title" in problem or "detail" in problem):
        title, detail = problem.get("title") or response.reason_phrase, problem.get("detail") or ""
        return f"refused ({response.status_code} {title}): {detail}".rstrip(": ")
    return f"refused ({response.status_code} {response.reason_phrase}): {' '.join(response.text.split())[:200]}"


async def upload_file(
    settings: CommonSettings, path: Path, *, title: str | None = None, renditions: str | None = None
) -> str:
    """Upload one file; returns its video id. Raises Failure with the reason if it cannot be sent or is refused."""
    upload_url, _ = urls(settings)
    form = {"title": title or path.stem}
    if renditions:
        form["renditions"] = check_renditions(renditions)
    token = user_token(settings)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with await asyncio.to_thread(open_video, path) as file:
        bar = Bar(f"uploading {title or path.name}", os.fstat(file.fileno()).st_size)
        files = {"file": (path.name, _Counting(file, bar), "application/octet-stream")}
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
                response = await client.post(f"{upload_url}/videos", data=form, files=files, headers=headers)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            bar.abandon()
            raise unreachable("upload service", upload_url, exc) from None
    if response.status_code != 202:
        bar.abandon()
        raise Failure(f"{path.name}: {refusal(response)}")
    video_id: str = response.json()["video_id"]
    bar.done(video_id)
    return video_id


async def live_changes(store_url: str) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
    """The store's server-sent events as (event, data) pairs, from `ready` on.

    Close it with `contextlib.aclosing`: left to the event loop's shutdown, its open stream is
    closed from two sides at once and Python prints an `aclose()` traceback."""
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10)) as client:
            async with client.stream("GET", f"{store_url}/events") as response:
                if response.status_code != 200:
                    await response.aread()
                    raise Failure(f"the store at {store_url}: live stream {refusal(response)}")
                event, data = "message", ""
                async for raw in response.aiter_lines():
                    if raw.startswith("event:"):
                        event = raw[6:].strip()
                    elif raw.startswith("data:"):
                        data += raw[5:].strip()
                    elif raw == "" and data:
                        yield event, json.loads(data)
                        event, data = "message", ""
    except httpx.TransportError as exc:
        raise unreachable("store", store_url, exc) from None
    raise Failure(f"the store at {store_url} ended its live stream (is it stopping?)")


async def run(settings: CommonSettings, args: argparse.Namespace) -> int:
    # Everything that can be checked here is, before anything is sent.
    if args.renditions is not None:
        check_renditions(args.renditions)
    await asyncio.to_thread(lambda: open_video(args.file).close())
    _, store_url = urls(settings)
    if not args.wait:
        video_id = await upload_file(settings, args.file, title=args.title, renditions=args.renditions)
        line(f"{video_id}: uploaded; watch it at {store_url}/watch/{video_id}")
        return 0
    async with contextlib.aclosing(live_changes(store_url)) as changes:
        await anext(changes)  # listening before the upload: no change can be missed
        video_id = await upload_file(settings, args.file, title=args.title, renditions=args.renditions)
        bar = Bar(args.title or args.file.name)
        async for event, video in changes:
            if event != "video" or video.get("video_id") != video_id:
                continue
            status = video.get("status") or ""
            if status not in ("ready", "failed", "deleted"):
                bar.show(float(video.get("progress") or 0), phase(status))
                continue
            bar.done(phase(status))
            for rendition in video.get("renditions", []):
                line(f"  {rendition['name']:>6} {rendition['width']}x{rendition['height']}  {rendition['url']}")
            if video.get("error"):
                line(f"  error: {video['error']}")
            return 0 if status == "ready" else 1
    return 1
