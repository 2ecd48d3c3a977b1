"""`cattube demo`: the lecture's story end to end.

Starts the stack if it is not running, makes a few "Whiskers on the beach" clips (one of them 4K)
with the bundled ffmpeg, uploads them, and follows the store's live stream: each video from
uploaded to ready with a progress bar, and the autoscaler going from zero workers to as many as
the backlog needs and back to zero. Then it prints where to watch them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiofiles
import httpx

from services.cli.failure import Failure
from services.cli.progress import Bar, line, phase
from services.cli.up import PAGE_LINE
from services.cli.upload import live_changes, upload_file, urls
from services.common.media import ffmpeg_exe
from services.common.settings import CommonSettings

# (file name, title, width, height, seconds, audio)
CLIPS = [
    ("whiskers-4k.mp4", "Whiskers on the beach (4K)", 3840, 2160, 4, True),
    ("whiskers-phone.mp4", "Whiskers on the phone (portrait)", 720, 1280, 4, True),
    ("whiskers-quiet.mp4", "Whiskers, quietly", 1280, 720, 4, False),
]
STARTUP_S = 60
STOP_S = 30
"""Longer than `cattube up` takes to stop its four services one by one, each by its deadline."""


def stack_log(settings: CommonSettings) -> Path:
    """Where the demo keeps the log of the stack it started (the real path is printed, not a pattern)."""
    return (settings.data_dir / "demo" / "stack.log").resolve()


def make_clip(path: Path, width: int, height: int, seconds: int, audio: bool) -> None:
    """A test pattern with a tone: what a camera on the beach would give, give or take a cat."""
    video = f"testsrc2=size={width}x{height}:rate=25:duration={seconds}"
    argv = [ffmpeg_exe(), "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i", video]
    if audio:
        argv += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", "-c:a", "aac"]
    argv += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-shortest", str(path)]
    subprocess.run(argv, check=True)


async def healthy(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(f"{url}/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


async def start_stack(settings: CommonSettings) -> tuple[asyncio.subprocess.Process, asyncio.Task[None]]:
    """Run `cattube up` and return once it says every service serves (read from its log,
    which goes to `stack_log` rather than into the demo's own output)."""
    log_path = stack_log(settings)
    await asyncio.to_thread(log_path.parent.mkdir, parents=True, exist_ok=True)
    # In a process group of its own: a Ctrl-C at the terminal reaches the demo only, which then
    # stops the stack once (a second SIGINT would make `cattube up` kill its services at once).
    stack = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "--data-dir", str(settings.data_dir), "up",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        process_group=0,
    )  # fmt: skip
    serving = False
    ready = asyncio.Event()
    last_lines: collections.deque[str] = collections.deque(maxlen=2)  # a failure of `cattube up` is two lines

    async def follow() -> None:
        nonlocal serving
        assert stack.stdout is not None
        async with aiofiles.open(log_path, "ab") as log:
            async for raw in stack.stdout:
                await log.write(raw)
                last_lines.append(raw.decode(errors="replace").strip())
                if raw.startswith(PAGE_LINE.encode()):
                    serving = True
                    ready.set()
        ready.set()  # the stack exited: stop waiting

    follower = asyncio.create_task(follow())
    try:
        async with asyncio.timeout(STARTUP_S):
            await ready.wait()
    except TimeoutError:
        raise Failure(f"the stack did not start within {STARTUP_S}s; see {log_path}") from None
    if not serving:
        await stack.wait()
        raise Failure(f"cattube up exited ({' '.join(last_lines) or f'status {stack.returncode}'}); see {log_path}")
    return stack, follower


async def run(settings: CommonSettings) -> int:
    upload_url, store_url = urls(settings)
    router_url = f"http://127.0.0.1:{settings.router_port}"
    processing_url = f"http://127.0.0.1:{settings.processing_port}"
    service_urls = [router_url, upload_url, processing_url, store_url]
    stack: asyncio.subprocess.Process | None = None
    follower: asyncio.Task[None] | None = None
    if not all([await healthy(url) for url in service_urls]):
        line(f"Starting the stack (cattube up; its log: {stack_log(settings)}) ...")
        stack, follower = await start_stack(settings)
    try:
        await story(settings, store_url)
        line(f"\nWatch them at {store_url}/  (router API: {router_url}/docs)")
        if stack is not None:
            line("The stack keeps running for you: Ctrl-C stops it.")
            await stack.wait()
    finally:
        if stack is not None and stack.returncode is None:
            stack.send_signal(signal.SIGINT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stack.wait(), STOP_S)
        if follower is not None:
            await follower
    return 0


async def story(settings: CommonSettings, store_url: str) -> None:
    folder = settings.data_dir / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    line("Making the clips ...")
    for name, _, width, height, seconds, audio in CLIPS:
        path = folder / name
        if not path.exists():
            await asyncio.to_thread(make_clip, path, width, height, seconds, audio)
        line(f"  {name}: {width}x{height}, {seconds}s{'' if audio else ', no audio'}")

    videos: dict[str, str] = {}
    finished: dict[str, dict[str, Any]] = {}
    workers, peak = 0, 0
    async with contextlib.aclosing(live_changes(store_url)) as changes:
        await anext(changes)  # listening before the uploads: nothing is missed
        for name, title, *_ in CLIPS:
            videos[await upload_file(settings, folder / name, title=title, renditions="1080p,720p,360p")] = name

        bars = {video_id: Bar(name) for video_id, name in videos.items()}
        async for event, data in changes:
            if event == "scaled":
                workers = int(data.get("to", 0))
                peak = max(peak, workers)
                line(f"  autoscaler: {data.get('from')} -> {workers} workers (backlog {data.get('backlog')})")
            elif event == "video" and data.get("video_id") in videos:
                video_id, status = data["video_id"], data.get("status") or ""
                if status in ("ready", "failed"):
                    if video_id not in finished:
                        bars[video_id].done(phase(status))
                    finished[video_id] = data
                else:
                    bars[video_id].show(float(data.get("progress") or 0), phase(status))
            if len(finished) == len(videos) and workers == 0 and peak > 0:
                break

    line(f"\nThe fleet went 0 -> {peak} -> 0 workers. Renditions:")
    for video_id, video in finished.items():
        line(f"  {videos[video_id]} ({video.get('status')}):")
        for rendition in video.get("renditions", []):
            line(f"    {rendition['name']:>6} {rendition['width']}x{rendition['height']}  {rendition['url']}")
        if video.get("error"):
            line(f"    error: {video['error']}")
