"""The processing service as a real process, with a real router: clips in, renditions out, autoscaling, crashes.

Every test checks afterwards that no ffmpeg started on its files is still running (`/proc`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import httpx
import m3u8
import pytest

from router.client import RouterClient, new_event
from services.common.blobs import FileBlobStore, video_key
from services.processing.deletions import deletions_queue_name
from services.processing.ladder import displayed_size
from tests.media import make_clip, probe_of
from tests.process import ServiceProcess, service
from tests.services.processing.test_transcode import inspect

pytestmark = pytest.mark.slow

TOKEN = "tok"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --- helpers -----------------------------------------------------------------------------------------------------


def ffmpeg_processes(marker: str) -> list[int]:
    """Pids of live ffmpeg processes whose command line mentions `marker` (a test's own directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and "ffmpeg" in os.path.basename(argv[0].decode(errors="replace")):
            if any(marker.encode() in arg for arg in argv):
                found.append(int(entry))
    return found


async def no_ffmpeg_within(marker: str, timeout_s: float) -> list[int]:
    # A process's end has no event to wait on from here: look at /proc a few times a second.
    for _ in range(int(timeout_s / 0.05)):
        if not (left := ffmpeg_processes(marker)):
            return left
        await asyncio.sleep(0.05)
    return ffmpeg_processes(marker)


@pytest.fixture(autouse=True)
async def no_ffmpeg_left_behind(tmp_path: Path) -> AsyncIterator[None]:
    yield
    assert await no_ffmpeg_within(str(tmp_path), 3) == []


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {
        "uhd": make_clip(folder / "uhd.mp4", 3840, 2160, 2, fps=10),
        "portrait": make_clip(folder / "portrait.mp4", 640, 360, 2, rotate=90, fps=10),
        "silent": make_clip(folder / "silent.mp4", 320, 240, 2, audio=False, fps=10),
        "slow": make_clip(folder / "slow.mp4", 1280, 720, 8, fps=25),
        # For stopping mid-transcode: `slow` transcodes in ~3 s on a quiet machine, and the first progress
        # event is seen ~2 s in (it waits a second for company, services/processing/events.py).
        "longer": make_clip(folder / "longer.mp4", 1280, 720, 16, fps=25),
    }


@dataclass
class Observer:
    """Events of `cattube.transcode.*` and `cattube.processing.scaled`, through a queue of the test's own."""

    client: RouterClient
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def until(self, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 30) -> list[dict[str, Any]]:
        queue = self.client.queue("observer")
        async with asyncio.timeout(timeout_s):
            while not done(self.seen):
                for message in await queue.receive(max_messages=10, wait_s=5):
                    self.seen.append(message.event)
                    await queue.ack([message.receipt])
        return self.seen

    def of(self, kind: str, video_id: str | None = None) -> list[dict[str, Any]]:
        return [
            e for e in self.seen if e["type"] == kind and (video_id is None or e["data"].get("video_id") == video_id)
        ]


@dataclass
class Stack:
    router: ServiceProcess
    processing: ServiceProcess
    client: RouterClient
    observer: Observer
    store: FileBlobStore
    env: dict[str, str]

    async def upload(self, video_id: str, clip: Path, renditions: list[str]) -> None:
        """What the upload service does: the master into the bucket, then `cattube.video.uploaded`."""
        info = await self.store.put_file(video_key(video_id, "master.mp4"), clip)
        data = {
            "video_id": video_id,
            "title": video_id,
            "master": {
                "uri": info.uri,
                "size_bytes": info.size_bytes,
                "sha256": info.sha256,
                "content_type": "video/mp4",
            },
            "probe": probe_of(clip),
            "renditions": renditions,
        }
        await self.client.publish(
            new_event("cattube.video.uploaded", "cattube/upload", data, id=video_id, partitionkey=video_id)
        )

    async def autoscaler(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.processing.url, headers=AUTH) as http:
            response = await http.get("/autoscaler")
            response.raise_for_status()
            state: dict[str, Any] = response.json()
            return state


@asynccontextmanager
async def stack(tmp_path: Path, **settings: str) -> AsyncIterator[Stack]:
    data = tmp_path / "data"
    async with service("router", {"CATTUBE_DATA_DIR": str(data), "CATTUBE_TOKEN": TOKEN}) as router:
        async with RouterClient(router.url, token=TOKEN) as client:
            # Declared before anything is published, from the start: the test sees every event.
            await client.ensure_subscription(
                "observer",
                pattern={"type": [{"prefix": "cattube.transcode."}, "cattube.processing.scaled"]},
                target={"queue": {}},
                start="earliest",
            )
            env = {
                "CATTUBE_DATA_DIR": str(data),
                "CATTUBE_TOKEN": TOKEN,
                "CATTUBE_ROUTER_URL": router.url,
                "CATTUBE_MAX_WORKERS": "2",
                "CATTUBE_SCALE_IN_COOLDOWN_S": "1",
                "CATTUBE_RECEIVE_WAIT_S": "5",
                **{f"CATTUBE_{name.upper()}": value for name, value in settings.items()},
            }
            async with service("services.processing", env) as processing:
                yield Stack(router, processing, client, Observer(client), FileBlobStore(data / "bucket"), env)


def short_side(width: int, height: int) -> int:
    return min(width, height)


# --- the tests ---------------------------------------------------------------------------------------------------


async def test_clips_are_transcoded_while_the_fleet_scales_from_zero_and_back(
    tmp_path: Path, clips: dict[str, Path]
) -> None:
    requests = {
        "uhd": ["1080p", "360p"],
        "portrait": ["720p", "360p", "240p"],
        "silent": ["480p", "240p", "144p"],
    }
    async with stack(tmp_path) as s:
        assert (await s.autoscaler())["running"] == 0
        corrupt = tmp_path / "corrupt.mp4"
        corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + os.urandom(50_000))
        for video_id, renditions in requests.items():
            await s.upload(video_id, clips[video_id], renditions)
        info = await s.store.put_file(video_key("corrupt", "master.mp4"), corrupt)
        probe = {**probe_of(clips["silent"])}
        await s.client.publish(
            new_event(
                "cattube.video.uploaded",
                "cattube/upload",
                {"video_id": "corrupt", "master": {"uri": info.uri}, "probe": probe, "renditions": ["144p"]},
                id="corrupt",
                partitionkey="corrupt",
            )
        )

        def finished(seen: list[dict[str, Any]]) -> bool:
            done = {e["data"]["video_id"] for e in seen if e["type"].endswith((".completed", ".failed"))}
            scaled = [e["data"] for e in seen if e["type"] == "cattube.processing.scaled"]
            return len(done) == 4 and bool(scaled) and scaled[-1]["to"] == 0

        await s.observer.until(finished, timeout_s=60)

        # The corrupt master failed for good, with a reason a person can read.
        (failed,) = s.observer.of("cattube.transcode.failed")
        assert failed["data"]["video_id"] == "corrupt" and failed["data"]["permanent"] is True
        assert failed["data"]["input_rejected"] is True  # the master is at fault: the store offers no retry
        assert "could not be decoded" in failed["data"]["reason"]
        assert await s.store.stat(video_key("corrupt", "poster.jpg")) is None

        for video_id, renditions in requests.items():
            master = inspect(clips[video_id])
            shown = displayed_size(*master["size"], master["rotation"])
            (completed,) = s.observer.of("cattube.transcode.completed", video_id)
            data = completed["data"]
            assert completed["source"] == "cattube/processing" and completed["partitionkey"] == video_id
            assert s.observer.of("cattube.transcode.started", video_id)[0]["data"]["attempt"] == 1
            assert s.observer.of("cattube.transcode.progress", video_id)[-1]["data"]["percent"] == 100.0
            master_short = short_side(*shown)
            assert data["skipped"] == [r for r in renditions if int(r[:-1]) > master_short]
            assert [r["name"] for r in data["renditions"]] == [r for r in renditions if r not in data["skipped"]]
            for rendition in data["renditions"]:
                path = s.store.local_path(s.store.key_of(rendition["uri"]))
                assert path is not None and path.name == f"{rendition['name']}.mp4"
                facts = inspect(path)
                width, height = facts["size"]
                assert (width, height) == (rendition["width"], rendition["height"])
                assert short_side(width, height) == int(rendition["name"][:-1])
                assert (width > height) == (shown[0] > shown[1])  # orientation kept
                assert width <= shown[0] and height <= shown[1]  # never upscaled
                assert abs(facts["duration_s"] - master["duration_s"]) <= 0.1
                assert facts["rotation"] == 0 and facts["codec"] == "h264"
                assert bool(facts["audio"]) == bool(master["audio"])
                assert rendition["size_bytes"] == path.stat().st_size and rendition["bitrate"] > 0
            poster = s.store.local_path(s.store.key_of(data["poster"]["uri"]))
            assert poster is not None and poster.read_bytes()[:3] == b"\xff\xd8\xff"
            # The HLS package sits under the video's prefix, one folder per rung, and lists every rung.
            master_key = s.store.key_of(data["hls"]["uri"])
            assert re.fullmatch(rf"videos/{video_id}/hls/[0-9a-f]{{12}}/master\.m3u8", master_key)
            master_path = s.store.local_path(master_key)
            assert master_path is not None
            playlist = m3u8.M3U8(master_path.read_text(), strict=True)
            assert [v.uri for v in playlist.playlists] == [f"{r['name']}/index.m3u8" for r in data["renditions"]]
            folder = master_key.rsplit("/", 1)[0]
            for rendition in data["renditions"]:
                stored = await s.store.list(f"{folder}/{rendition['name']}/")
                names = sorted(key.rsplit("/", 1)[1] for key in stored)
                assert (
                    names[:2] == ["index.m3u8", "init.mp4"]
                    and names[2:]
                    and all(re.fullmatch(r"seg-\d{5}\.m4s", n) for n in names[2:])
                ), names
            with av.open(str(poster)) as image:
                assert image.streams.video[0].codec_context.name == "mjpeg"

        # The portrait clip is stored 640x360 with a quarter turn: its renditions are upright portrait.
        (portrait,) = s.observer.of("cattube.transcode.completed", "portrait")
        assert [(r["width"], r["height"]) for r in portrait["data"]["renditions"]] == [(360, 640), (240, 426)]

        # 0 -> at least 2 -> 0, in the events and in the history.
        scaled = [e["data"] for e in s.observer.of("cattube.processing.scaled")]
        assert scaled[0]["from"] == 0 and max(c["to"] for c in scaled) >= 2 and scaled[-1]["to"] == 0
        state = await s.autoscaler()
        history = [(c["from"], c["to"]) for c in state["history"]]
        assert history == [(c["from"], c["to"]) for c in scaled]
        assert state["running"] == 0 and state["busy"] == 0 and state["desired"] == 0
        assert all(c["reason"] for c in state["history"])
        stats = await s.client.stats("transcode")
        assert (stats.backlog, stats.in_flight, stats.dead_lettered) == (0, 0, 0)


async def test_a_job_survives_kill_9_of_the_service(tmp_path: Path, clips: dict[str, Path]) -> None:
    async with stack(tmp_path, visibility_timeout_s="3") as s:
        await s.upload("slow", clips["longer"], ["720p", "360p"])
        await s.observer.until(lambda seen: bool(s.observer.of("cattube.transcode.progress", "slow")))
        running = ffmpeg_processes(str(tmp_path))
        assert len(running) == 1

        await s.processing.kill()
        # PR_SET_PDEATHSIG: the encoder dies with the service instead of encoding on for nobody.
        assert await no_ffmpeg_within(str(tmp_path), 3) == []
        assert not s.observer.of("cattube.transcode.completed")
        # The killed run could not clean up: its partial outputs are still there...
        work = Path(s.env["CATTUBE_DATA_DIR"]) / "processing" / "work"
        partial = list(work.glob("*/out/.transcode-*"))
        assert partial

        # After a restart the job is received again once its visibility timeout has run out, and completes.
        await s.processing.start()
        # ...until the restart sweeps them, before any worker runs.
        assert not any(folder.exists() for folder in partial)
        await s.observer.until(lambda seen: bool(s.observer.of("cattube.transcode.completed", "slow")))
        attempts = [e["data"]["attempt"] for e in s.observer.of("cattube.transcode.started", "slow")]
        assert attempts == [1, 2]
        (completed,) = s.observer.of("cattube.transcode.completed", "slow")
        assert completed["data"]["attempt"] == 2
        assert [r["name"] for r in completed["data"]["renditions"]] == ["720p", "360p"]
        assert await s.store.stat(video_key("slow", "720p.mp4")) is not None
        assert list(work.glob("*/out/.transcode-*")) == []
        # The killed run could not say it stopped: the restart says it for it, or the store's fleet chart would
        # count its worker for as long as this instance does not scale again.
        scaled = [e["data"] for e in s.observer.of("cattube.processing.scaled")]
        restarted = [(d["from"], d["to"]) for d in scaled if d["reason"].startswith("the instance restarted")]
        assert restarted == [(1, 0)], scaled


async def test_sigterm_hands_a_running_job_back_at_once(tmp_path: Path, clips: dict[str, Path]) -> None:
    async with stack(tmp_path, shutdown_grace_s="0.5") as s:
        await s.upload("slow", clips["longer"], ["720p", "360p"])
        await s.observer.until(lambda seen: bool(s.observer.of("cattube.transcode.progress", "slow")))
        # uvicorn re-raises the signal after a graceful shutdown, so the exit status is -SIGTERM.
        assert await s.processing.stop() in (0, -signal.SIGTERM)
        assert any("Application shutdown complete" in line for line in s.processing.log)
        # "At once": the transcode was cut short (no ffmpeg left, no rendition written), not waited for.
        assert ffmpeg_processes(str(tmp_path)) == []
        stats = await s.client.stats("transcode")
        # Nacked with no delay: ready for the next worker now, not after a visibility timeout.
        assert (stats.backlog, stats.in_flight, stats.delayed) == (1, 0, 0)
        assert await s.store.stat(video_key("slow", "720p.mp4")) is None


def outbox_ids(data_dir: Path) -> list[str]:
    """Ids of the events waiting in the processing service's outbox."""
    path = data_dir / "processing" / "outbox.db"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [json.loads(row[0])["id"] for row in db.execute("SELECT event FROM outbox ORDER BY seq")]


async def test_sigterm_after_the_router_went_first_drops_nothing(tmp_path: Path, clips: dict[str, Path]) -> None:
    """What Ctrl-C on `cattube up` used to do: the router stops first, then processing, mid-transcode."""
    data = tmp_path / "data"
    async with stack(tmp_path, visibility_timeout_s="3") as s:
        await s.upload("slow", clips["longer"], ["720p", "360p"])
        await s.observer.until(lambda seen: bool(s.observer.of("cattube.transcode.progress", "slow")))
        await s.router.stop()
        # The job keeps reporting progress with nobody to take it: those events wait in the outbox.
        await s.processing.wait_for_log("cannot publish", 60)
        assert await s.processing.stop() in (0, -signal.SIGTERM)
        log = "\n".join(s.processing.log)
        assert "dropped" not in log and "Traceback" not in log, log
        # The hand-back could not reach the router: said once, plainly, and the lease expires on its own.
        assert "WARNING" in log and "nack of video slow failed" in log and "visibility timeout" in log
        kept = outbox_ids(data)
        assert kept and "kept in the outbox" in log
        assert ffmpeg_processes(str(tmp_path)) == []
        assert list((data / "processing" / "work").glob("*/out/.transcode-*")) == []

        # Both back: the kept events go out first, and the job runs again (after its lease ran out) to the end.
        await s.router.start()
        await s.processing.start()
        await s.observer.until(lambda seen: bool(s.observer.of("cattube.transcode.completed", "slow")), 60)
        assert set(kept) <= {e["id"] for e in s.observer.seen}
        assert outbox_ids(data) == []
        attempts = [e["data"]["attempt"] for e in s.observer.of("cattube.transcode.started", "slow")]
        assert attempts == [1, 2]


async def test_deleting_a_video_stops_its_job_and_removes_its_blobs(tmp_path: Path, clips: dict[str, Path]) -> None:
    async with stack(tmp_path) as s:
        await s.upload("doomed", clips["longer"], ["720p", "360p"])
        await s.observer.until(lambda seen: bool(s.observer.of("cattube.transcode.progress", "doomed")))
        assert len(ffmpeg_processes(str(tmp_path))) == 1
        await s.client.publish(
            new_event("cattube.video.deleted", "cattube/store", {"video_id": "doomed"}, id="doomed/deleted")
        )
        assert await no_ffmpeg_within(str(tmp_path), 5) == []
        async for stats in s.client.watch_stats("transcode", wait_s=10):
            if (stats.backlog, stats.in_flight) == (0, 0):
                break
        assert not (s.store.root / "videos" / "doomed").exists()
        assert not s.observer.of("cattube.transcode.completed") and not s.observer.of("cattube.transcode.failed")
        deletions = await s.client.stats(deletions_queue_name((await s.autoscaler())["instance"]))
        assert (deletions.backlog, deletions.in_flight, deletions.delivered_total) == (0, 0, 1)


async def test_idle_service_sleeps(tmp_path: Path) -> None:
    """No polling: idle, the service wakes up only for uvicorn's own 10-a-second tick.

    Wake-ups (voluntary context switches, from /proc) are counted rather than CPU time alone: they
    do not depend on how loaded the machine is, and a sleep loop shows up in them at once.
    """
    async with stack(tmp_path, min_workers="1") as s:  # one idle worker in its long poll, too
        assert s.processing.proc is not None
        pid = s.processing.proc.pid
        async with httpx.AsyncClient(base_url=s.processing.url, headers=AUTH) as http:
            for _ in range(100):  # start-up: the subscriptions are declared in the background
                if (await http.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
        await asyncio.sleep(1)

        def wakeups_and_cpu_s() -> tuple[int, float]:
            wakeups = 0
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/status") as status:
                    wakeups += sum(int(line.split()[1]) for line in status if line.startswith("voluntary_ctxt"))
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return wakeups, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        wakeups_before, cpu_before = wakeups_and_cpu_s()
        await asyncio.sleep(3)
        wakeups_after, cpu_after = wakeups_and_cpu_s()
        wakeups, cpu_s = wakeups_after - wakeups_before, cpu_after - cpu_before
        assert wakeups <= 3 * 15, f"{wakeups} wake-ups in 3 s"
        assert cpu_s <= 0.15, f"idle processing service used {cpu_s:.2f} s of CPU in 3 s"
