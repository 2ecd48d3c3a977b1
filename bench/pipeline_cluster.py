"""Pipeline on the cluster's parts (S3 + PostgreSQL) against the single-machine ones (file:// + SQLite),
and two processing instances against one on the same queue.

    .venv/bin/python bench/pipeline_cluster.py [--clips 8] [--rounds 3] [--workers 2]

In one sitting it starts a throwaway PostgreSQL and SeaweedFS (tests/postgres.py, tests/s3.py: the
servers `cattube up --cluster` runs) and three stacks, each a router and processing:

- `file_sqlite`: router on SQLite, blobs in a file:// bucket (bench/pipeline.py's stack);
- `s3_postgres`: router and processing's outbox on PostgreSQL (a database of its own), blobs in S3;
- `s3_postgres_x2`: the same with two processing instances on the one queue.

Each instance may run `--workers` ffmpeg at once. A round puts N masters in the stack's bucket,
publishes one `cattube.video.uploaded` each and waits for the last `cattube.transcode.completed`;
rounds alternate between the stacks because this machine is shared and noisy. Reported per stack:
wall time and jobs per minute (medians), and CPU seconds per job of the router, processing (with its
ffmpeg children) and, for the cluster stacks, PostgreSQL's and SeaweedFS's processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from harness import cpu_s
from pipeline import Process, make_clip, uploaded, wait_completed

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from router.client import RouterClient  # noqa: E402
from services.cli import local_seaweedfs  # noqa: E402
from services.common.blobs import BlobStore, open_blob_store, video_key  # noqa: E402
from tests.media import probe_of  # noqa: E402
from tests.postgres import database_url, throwaway_postgres  # noqa: E402
from tests.s3 import new_bucket, throwaway_seaweedfs  # noqa: E402


def tree_cpu_s(root: int) -> float:
    """CPU seconds of `root` and its live direct children (PostgreSQL's backends, say)."""
    total = cpu_s(root)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == root:
                total += cpu_s(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return total


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@dataclass
class Stack:
    name: str
    router: Process
    processing: list[Process]
    client: RouterClient
    store: BlobStore
    walls: list[float] = field(default_factory=list)
    cpu: list[dict[str, float]] = field(default_factory=list)

    def cpu_now(self) -> dict[str, float]:
        return {
            "router": cpu_s(self.router.pid),
            "processing_and_ffmpeg": sum(cpu_s(p.pid, children=True) for p in self.processing),
            **{f"processing_{n + 1}": cpu_s(p.pid, children=True) for n, p in enumerate(self.processing)},
        }


@asynccontextmanager
async def stack(
    name: str, data: Path, env: dict[str, str], blob_url: str, instances: int, workers: int
) -> AsyncIterator[Stack]:
    router = Process(
        "router", {**env, "CATTUBE_DATA_DIR": str(data / "router"), "CATTUBE_SQLITE_SYNCHRONOUS": "NORMAL"}
    )
    await router.start()
    processing = [
        Process(
            "services.processing",
            {
                **env,
                "CATTUBE_DATA_DIR": str(data / f"processing-{n + 1}"),
                "CATTUBE_INSTANCE": f"processing-{n + 1}",
                "CATTUBE_ROUTER_URL": router.url,
                "CATTUBE_BLOB_URL": blob_url,
                "CATTUBE_MAX_WORKERS": str(workers),
                "CATTUBE_SCALE_IN_COOLDOWN_S": "2",
            },
        )
        for n in range(instances)
    ]
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})  # this script's own S3 client
    try:
        store = open_blob_store(blob_url)
        for process in processing:
            await process.start()
        async with RouterClient(router.url) as client:
            await client.ensure_subscription(
                "bench", pattern={"type": ["cattube.transcode.completed"]}, target={"queue": {}}
            )
            for process in processing:
                async with httpx.AsyncClient(base_url=process.url) as http:
                    for _ in range(200):  # subscriptions declared in the background
                        if (await http.get("/readyz")).status_code == 200:
                            break
                        await asyncio.sleep(0.05)
            yield Stack(name, router, processing, client, store)
    finally:
        for key, value in saved.items():
            if key.startswith("AWS_") and value is None:
                os.environ.pop(key, None)
        for process in processing:
            await process.stop()
        await router.stop()


async def one_round(target: Stack, clip: Path, probe: dict[str, Any], tag: str, clips: int) -> None:
    events = []
    for i in range(clips):
        info = await target.store.put_file(video_key(f"{tag}-{i}", "master.mp4"), clip)
        events.append(uploaded(f"{tag}-{i}", info.uri, probe))
    before = target.cpu_now()
    started = time.perf_counter()
    await target.client.publish_batch(events)
    await wait_completed(target.client, clips)
    target.walls.append(time.perf_counter() - started)
    after = target.cpu_now()
    target.cpu.append({key: after[key] - before[key] for key in after})


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="ffmpeg at once per instance")
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--duration-s", type=float, default=4)
    args = parser.parse_args()
    width, height = (int(n) for n in args.size.split("x"))
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp_name, throwaway_postgres() as pg_url, throwaway_seaweedfs() as s3:
        tmp = Path(tmp_name)
        clip = await make_clip(tmp / "clip.mp4", width, height, args.duration_s)
        probe = probe_of(clip)
        s3_env = local_seaweedfs.environment(s3.endpoint, s3.app)
        connection = await asyncpg.connect(pg_url)
        postmaster = parent_pid(await connection.fetchval("SELECT pg_backend_pid()"))
        databases = [f"cattube_bench_{secrets.token_hex(4)}" for _ in range(2)]
        for name in databases:
            await connection.execute(f'CREATE DATABASE "{name}"')
        await connection.close()
        buckets = [await new_bucket(s3) for _ in range(2)]
        async with AsyncExitStack() as stacks:
            stacks_list = [
                await stacks.enter_async_context(
                    stack("file_sqlite", tmp / "a", {}, f"file://{tmp / 'a' / 'bucket'}", 1, args.workers)
                ),
                await stacks.enter_async_context(
                    stack(
                        "s3_postgres",
                        tmp / "b",
                        {**s3_env, "CATTUBE_DATABASE_URL": database_url(pg_url, databases[0])},
                        f"s3://{buckets[0]}",
                        1,
                        args.workers,
                    )
                ),
                await stacks.enter_async_context(
                    stack(
                        "s3_postgres_x2",
                        tmp / "c",
                        {**s3_env, "CATTUBE_DATABASE_URL": database_url(pg_url, databases[1])},
                        f"s3://{buckets[1]}",
                        2,
                        args.workers,
                    )
                ),
            ]
            for r in range(args.rounds):
                for target in stacks_list:
                    pg_before, s3_before = tree_cpu_s(postmaster), cpu_s(s3.pid or 0) if s3.pid else 0.0
                    await one_round(target, clip, probe, f"{target.name}-r{r}", args.clips)
                    servers_cpu = tree_cpu_s(postmaster) - pg_before + (cpu_s(s3.pid) - s3_before if s3.pid else 0)
                    target.cpu[-1]["postgres_and_seaweedfs"] = servers_cpu
                    print(
                        f"round {r + 1} {target.name}: {target.walls[-1]:.2f} s, "
                        f"{json.dumps({k: round(v, 2) for k, v in target.cpu[-1].items()})}",
                        file=sys.stderr,
                        flush=True,
                    )

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "clips_per_round": args.clips,
        "clip": f"{width}x{height} {args.duration_s:g} s 25 fps H.264+AAC -> 720p,480p,360p",
        "ffmpeg_per_instance": args.workers,
    }
    for target in stacks_list:
        wall = statistics.median(target.walls)
        per_job = {key: round(statistics.median(c[key] for c in target.cpu) / args.clips, 3) for key in target.cpu[0]}
        result[target.name] = {
            "wall_s_median": round(wall, 2),
            "walls_s": [round(w, 2) for w in target.walls],
            "jobs_per_minute": round(args.clips / wall * 60, 1),
            "cpu_s_per_job": per_job,
        }
    base = result["file_sqlite"]["wall_s_median"]
    result["wall_ratio_s3_postgres_to_file_sqlite"] = round(result["s3_postgres"]["wall_s_median"] / base, 3)
    result["jobs_per_minute_ratio_x2_to_x1"] = round(
        result["s3_postgres_x2"]["jobs_per_minute"] / result["s3_postgres"]["jobs_per_minute"], 3
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
