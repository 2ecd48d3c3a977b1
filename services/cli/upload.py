"""`cattube upload FILE`: send a video to the upload service, with a progress bar; `--wait` follows
it through processing on the store's live stream until it is ready or has failed. The upload is
resumable (tus): if it is cut short, the same command again sends only what the server lacks."""

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
from services.cli.resumable import TUS, Remembered, body_from, metadata_header, offset_of
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
    """Upload one file resumably (tus); returns its video id. Raises Failure with the reason if it cannot be
    sent or is refused. An upload of the same file that was cut short earlier goes on from where it stopped."""
    upload_url, _ = urls(settings)
    metadata = metadata_header(
        filename=path.name, title=title or path.stem, renditions=check_renditions(renditions) if renditions else None
    )
    token = user_token(settings)
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    remembered = Remembered(settings.data_dir)
    with await asyncio.to_thread(open_video, path) as file:
        key = remembered.key(path, file)
        size = os.fstat(file.fileno()).st_size
        bar = Bar(f"uploading {title or path.name}", size)
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
                url, offset = await _begin(client, upload_url, remembered, key, size, metadata, auth, path)
                if offset < size:
                    if offset:
                        line(f"{path.name}: resuming at {offset} of {size} bytes")
                    headers = {
                        **TUS,
                        **auth,
                        "Upload-Offset": str(offset),
                        "Content-Type": "application/offset+octet-stream",
                        "Content-Length": str(size - offset),
                    }
                    response = await client.patch(url, content=body_from(file, offset, bar.show), headers=headers)
                    if response.status_code != 204:
                        if response.status_code != 409:  # refused for good: the server kept nothing of it
                            remembered.forget(key)
                        raise Failure(f"{path.name}: {refusal(response)}")
        except httpx.TransportError as exc:
            bar.abandon()
            failure = unreachable("upload service", upload_url, exc)
            raise Failure(f"{str(failure).rstrip('.')}; run the same command again to resume the upload") from None
        except Failure:
            bar.abandon()
            raise
    remembered.forget(key)
    video_id = url.rstrip("/").rsplit("/", 1)[1]  # a tus upload's id is its video id
    bar.done(video_id)
    return video_id


async def _begin(
    client: httpx.AsyncClient,
    upload_url: str,
    remembered: Remembered,
    key: str,
    size: int,
    metadata: str,
    auth: dict[str, str],
    path: Path,
) -> tuple[str, int]:
    """The upload to send to and how much of it the server has: the one begun earlier for this file, or a new one."""
    url = remembered.get(key)
    if url is not None:
        offset = await offset_of(client, url, auth)
        if offset is not None:
            return url, offset
        remembered.forget(key)  # expired or terminated: start again
    headers = {**TUS, **auth, "Upload-Length": str(size), "Upload-Metadata": metadata}
    response = await client.post(f"{upload_url}/uploads", headers=headers)
    if response.status_code != 201 or "location" not in response.headers:
        raise Failure(f"{path.name}: {refusal(response)}")
    url = response.headers["location"]
    remembered.put(key, url)
    return url, 0


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
