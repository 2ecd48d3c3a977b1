"""Processing pipeline benchmark: clips through router + processing service against ffmpeg run directly.

    .venv/bin/python bench/pipeline.py [--clips 8] [--workers 2] [--rounds 3]

In one script, on one machine:

1. **Wall time.** The same N clips are transcoded (a) directly, calling the same `transcode()` the
   workers call (so the very same ffmpeg commands: the encode, and the HLS packaging that cuts its
   MP4s into segments and playlists) with the same parallelism and threads per job,
   and (b) through the stack: masters in the bucket, one `cattube.video.uploaded` each, until the
   last `cattube.transcode.completed` reaches a subscriber. Rounds alternate (direct, service,
   direct, ...) because this machine is shared and noisy; the ratio of the medians is reported.
   Both sides make the same outputs (MP4 rungs, poster, HLS package); the service also stores them in
   the bucket and publishes its events.
2. **Start latency.** One upload at a time, from publishing `cattube.video.uploaded` to the
   moment an ffmpeg child of the processing service appears in /proc (watched every 2 ms, so the
   figure is at most 2 ms late): cold (0 workers: the autoscaler has to spawn one) and warm
   (`min_workers` 1: an idle worker is already in its long poll).
   The CPU seconds of each side (this process and its ffmpeg children; the router and the processing
   service with theirs) are reported too: unlike wall time they barely move with the machine's load.
   They are split (script or processing service, ffmpeg, router): ffmpeg runs the same commands on
   both sides, so `cpu_ratio_same_ffmpeg` (direct ffmpeg + processing + router over direct ffmpeg +
   script) is the service's own cost without the few % either way that ffmpeg's CPU drifts by.
   `--latency-samples 0 --idle-s 0` skips parts 2 and 3.
3. **Idle CPU.** User + system CPU seconds of the processing service over 30 s with nothing to do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from harness import cpu_s, free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from router.client import RouterClient, new_event  # noqa: E402
from services.common.blobs import FileBlobStore, video_key  # noqa: E402
from services.common.media import ffmpeg_exe  # noqa: E402
from services.processing.transcode import transcode  # noqa: E402
from tests.media import probe_of  # noqa: E402

RENDITIONS = ["720p", "480p", "360p"]
MAX_PIXELS = 7680 * 4320


def own_cpu_s() -> tuple[float, float]:
    """This process's CPU seconds and its reaped children's (the direct run's ffmpeg processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def service_cpu_s(processing: Process, router: Process) -> tuple[float, float, float]:
    """The processing service's own CPU seconds, its reaped children's (ffmpeg), and the router's."""
    both = cpu_s(processing.pid, children=True)
    own = cpu_s(processing.pid)
    return own, both - own, cpu_s(router.pid)


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


async def make_clip(path: Path, width: int, height: int, duration_s: float) -> Path:
    argv = [
        ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
        "-f", "lavfi", "-i", f"testsrc2=s={width}x{height}:r=25:d={duration_s}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:d={duration_s}",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*argv)
    if await proc.wait() != 0:
        raise RuntimeError("could not make the test clip")
    return path


class Process:
    def __init__(self, module: str, env: dict[str, str]) -> None:
        self.module, self.env, self.port = module, env, free_port()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.module, "--port", str(self.port),
            cwd=REPO, env={**os.environ, "CATTUBE_LOG_LEVEL": "warning", **self.env},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with httpx.AsyncClient() as http:
            for _ in range(600):
                try:
                    if (await http.get(self.url + "/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.module} did not start")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@asynccontextmanager
async def stack(data: Path, workers: int) -> AsyncIterator[tuple[Process, Process, RouterClient]]:
    router = Process("router", {"CATTUBE_DATA_DIR": str(data), "CATTUBE_SQLITE_SYNCHRONOUS": "NORMAL"})
    await router.start()
    processing = Process(
        "services.processing",
        {
            "CATTUBE_DATA_DIR": str(data),
            "CATTUBE_ROUTER_URL": router.url,
            "CATTUBE_MAX_WORKERS": str(workers),
            "CATTUBE_SCALE_IN_COOLDOWN_S": "2",
        },
    )
    try:
        await processing.start()
        async with RouterClient(router.url) as client:
            await client.ensure_subscription(
                "bench", pattern={"type": ["cattube.transcode.completed"]}, target={"queue": {}}
            )
            async with httpx.AsyncClient(base_url=processing.url) as http:
                for _ in range(200):  # subscriptions declared in the background
                    if (await http.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
            yield router, processing, client
    finally:
        await processing.stop()
        await router.stop()


def uploaded(video_id: str, info_uri: str, probe: dict[str, Any]) -> dict[str, Any]:
    data = {"video_id": video_id, "master": {"uri": info_uri}, "probe": probe, "renditions": RENDITIONS}
    return new_event("cattube.video.uploaded", "bench", data, id=video_id, partitionkey=video_id)


async def wait_completed(client: RouterClient, count: int) -> None:
    queue = client.queue("bench")
    while count:
        messages = await queue.receive(max_messages=10, wait_s=20)
        if any("hls" not in m.event["data"] for m in messages):
            raise RuntimeError("a transcode completed without its HLS package")
        if messages:
            await queue.ack([m.receipt for m in messages])
            count -= len(messages)


async def round_direct(clip: Path, probe: dict[str, Any], out: Path, clips: int, workers: int, threads: int) -> float:
    gate = asyncio.Semaphore(workers)

    async def one(i: int) -> None:
        async with gate:
            await transcode(
                clip, out / str(i), probe=probe, renditions=RENDITIONS, threads=threads,
                timeout_s=600, max_pixels=MAX_PIXELS,
            )  # fmt: skip

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clips)))
    return time.perf_counter() - started


async def round_service(
    client: RouterClient, store: FileBlobStore, clip: Path, probe: dict[str, Any], tag: str, clips: int
) -> float:
    events = []
    for i in range(clips):
        info = await store.put_file(video_key(f"{tag}-{i}", "master.mp4"), clip)
        events.append(uploaded(f"{tag}-{i}", info.uri, probe))
    started = time.perf_counter()
    await client.publish_batch(events)
    await wait_completed(client, clips)
    return time.perf_counter() - started


async def start_latency(
    client: RouterClient, store: FileBlobStore, processing: Process, clip: Path, probe: dict[str, Any], tag: str
) -> float:
    info = await store.put_file(video_key(tag, "master.mp4"), clip)
    before = set(children(processing.pid))
    event = uploaded(tag, info.uri, probe)
    started = time.perf_counter()
    await client.publish(event)
    for _ in range(10_000):  # no event says "ffmpeg started" from outside: watch /proc closely
        if set(children(processing.pid)) - before:
            break
        await asyncio.sleep(0.002)
    latency = time.perf_counter() - started
    await wait_completed(client, 1)
    return latency


async def start_latencies(
    client: RouterClient, store: FileBlobStore, processing: Process, clip: Path, probe: dict[str, Any], samples: int
) -> tuple[list[float], list[float]]:
    """Publish-to-ffmpeg latencies, `samples` of each: cold (from 0 workers) and warm (one idle worker waiting)."""
    await wait_for_zero_workers(processing)
    cold = []
    for i in range(samples):
        cold.append(await start_latency(client, store, processing, clip, probe, f"cold-{i}"))
        await wait_for_zero_workers(processing)
    async with httpx.AsyncClient(base_url=processing.url) as http:
        (await http.put("/autoscaler", json={"min_workers": 1})).raise_for_status()
    await asyncio.sleep(0.5)
    warm = [await start_latency(client, store, processing, clip, probe, f"warm-{i}") for i in range(samples)]
    async with httpx.AsyncClient(base_url=processing.url) as http:
        (await http.put("/autoscaler", json={"min_workers": 0})).raise_for_status()
    return cold, warm


async def wait_for_zero_workers(processing: Process) -> None:
    async with httpx.AsyncClient(base_url=processing.url) as http:
        for _ in range(600):
            if (await http.get("/autoscaler")).json()["running"] == 0:
                return
            await asyncio.sleep(0.2)
    raise RuntimeError("the fleet did not scale in")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--duration-s", type=float, default=4)
    parser.add_argument("--latency-samples", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=30)
    args = parser.parse_args()
    width, height = (int(n) for n in args.size.split("x"))
    threads = max(1, (os.cpu_count() or 1) // args.workers)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        clip = await make_clip(tmp / "clip.mp4", width, height, args.duration_s)
        probe = probe_of(clip)
        data = tmp / "data"
        async with stack(data, args.workers) as (router, processing, client):
            store = FileBlobStore(data / "bucket")
            direct, service, direct_cpu, service_cpu = [], [], [], []
            # Per round, where the CPU went: direct (script, ffmpeg), service (processing, ffmpeg, router).
            direct_split: list[tuple[float, ...]] = []
            service_split: list[tuple[float, ...]] = []
            for r in range(args.rounds):
                before = own_cpu_s()
                direct.append(await round_direct(clip, probe, tmp / f"direct-{r}", args.clips, args.workers, threads))
                direct_split.append(tuple(a - b for a, b in zip(own_cpu_s(), before, strict=True)))
                direct_cpu.append(sum(direct_split[-1]))
                before_service = service_cpu_s(processing, router)
                service.append(await round_service(client, store, clip, probe, f"r{r}", args.clips))
                service_split.append(
                    tuple(a - b for a, b in zip(service_cpu_s(processing, router), before_service, strict=True))
                )
                service_cpu.append(sum(service_split[-1]))
                d_own, d_ffmpeg = direct_split[-1]
                s_own, s_ffmpeg, s_router = service_split[-1]
                print(
                    f"round {r + 1}: direct {direct[-1]:.2f} s ({direct_cpu[-1]:.2f} CPU s: script {d_own:.2f}, "
                    f"ffmpeg {d_ffmpeg:.2f}), service {service[-1]:.2f} s ({service_cpu[-1]:.2f} CPU s: "
                    f"processing {s_own:.2f}, ffmpeg {s_ffmpeg:.2f}, router {s_router:.2f})",
                    file=sys.stderr,
                )

            cold: list[float] = []
            warm: list[float] = []
            idle_cpu: float | None = None
            if args.latency_samples:
                cold, warm = await start_latencies(client, store, processing, clip, probe, args.latency_samples)
            if args.idle_s:
                await wait_for_zero_workers(processing)
                await asyncio.sleep(1)
                idle_before = cpu_s(processing.pid)
                await asyncio.sleep(args.idle_s)
                idle_cpu = cpu_s(processing.pid) - idle_before

    direct_s, service_s = statistics.median(direct), statistics.median(service)
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "clips": args.clips,
        "clip": f"{width}x{height} {args.duration_s:g} s 25 fps H.264+AAC -> {','.join(RENDITIONS)}",
        "workers": args.workers,
        "threads_per_job": threads,
        "direct_s_median": round(direct_s, 2),
        "service_s_median": round(service_s, 2),
        "wall_time_ratio": round(service_s / direct_s, 3),
        "wall_time_ratios_per_round": [round(s / d, 3) for s, d in zip(service, direct, strict=True)],
        "cpu_s_direct_median": round(statistics.median(direct_cpu), 2),
        "cpu_s_service_median": round(statistics.median(service_cpu), 2),
        "cpu_ratio": round(statistics.median(service_cpu) / statistics.median(direct_cpu), 3),
        "cpu_s_direct_script_ffmpeg_medians": [round(statistics.median(c), 3) for c in zip(*direct_split, strict=True)],
        "cpu_s_service_processing_ffmpeg_router_medians": [
            round(statistics.median(c), 3) for c in zip(*service_split, strict=True)
        ],
        # ffmpeg runs the very same commands on both sides, so what its CPU differs by is the machine's noise (a few
        # % either way under load): the service's own cost against the same ffmpeg work is the steadier figure.
        "cpu_ratio_same_ffmpeg": round(
            (
                statistics.median(c[1] for c in direct_split)
                + sum(statistics.median(c[i] for c in service_split) for i in (0, 2))
            )
            / (statistics.median(c[1] for c in direct_split) + statistics.median(c[0] for c in direct_split)),
            3,
        ),
        "ffmpeg_cpu_ratio": round(
            statistics.median(c[1] for c in service_split) / statistics.median(c[1] for c in direct_split), 3
        ),
    }
    if cold and warm:
        result["start_latency_cold_ms_median"] = round(statistics.median(cold) * 1000, 1)
        result["start_latency_cold_ms_max"] = round(max(cold) * 1000, 1)
        result["start_latency_warm_ms_median"] = round(statistics.median(warm) * 1000, 1)
        result["start_latency_warm_ms_max"] = round(max(warm) * 1000, 1)
    if idle_cpu is not None:
        result["idle_cpu_s"] = round(idle_cpu, 3)
        result["idle_window_s"] = args.idle_s
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
