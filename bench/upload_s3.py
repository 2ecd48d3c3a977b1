"""Upload benchmark on S3: a 2 GiB upload through the upload service into SeaweedFS, against a bare obstore put.

    .venv/bin/python bench/upload_s3.py [--size-mib 2048] [--runs 3]

One throwaway SeaweedFS (`weed mini`, as the tests start it: tests/s3.py) serves both sides. The file
is written to disk once and is a real video: a 2 s 320x240 H.264/AAC MP4 followed by an MP4 `free`
box holding the rest of the bytes (filler every demuxer skips), so the service does all its work.

- bare: a process of its own that puts the file with `obstore.put_async` (the same 5 MiB parts and
  2 parts in flight as `S3BlobStore`), nothing else;
- upload, guessed: the same file sent by an aiohttp client (own process) as a raw `video/mp4` body to
  the upload service with `CATTUBE_BLOB_URL=s3://…`: streamed into a multipart upload under the
  master's likely name (its first bytes are an MP4 `ftyp` box) while hashed and spooled to local
  scratch, probed from the spool, the record and event committed (the router is down: they wait);
- upload, copied: the same with the first box renamed `junk` (still a valid MP4 to the probe, but
  its name cannot be guessed), so it streams to `incoming/master.upload` and is then copied
  server-side to `master.mp4`: what every S3 upload cost before the guess.

Runs alternate, one at a time (bare, guessed, copied), so the ratios per run compare like moments on
this shared machine. The script prints medians: time, the ratio upload/bare, the service's CPU
seconds per GiB (its probe child included) and SeaweedFS's apart, and the upload service's RSS
(peak `VmHWM` over every run, and the most seen while an upload streams, sampled every 0.2 s from
/proc) against the bare put's peak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from harness import cpu_s, free_port, serving

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
BLOCK = 1 << 20
PART_BYTES = 5 * 1024 * 1024  # as services/common/s3_blobs.py
PART_CONCURRENCY = 2


def status_kib(pid: int, field: str) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split(f"{field}:")[1].split()[0])


class RssSampler:
    """The largest VmRSS of a process seen while the block runs (a sample every 0.2 s, from a thread)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_kib = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(0.2):
            self.max_kib = max(self.max_kib, status_kib(self.pid, "VmRSS"))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()
        self.max_kib = max(self.max_kib, status_kib(self.pid, "VmRSS"))


def make_file(path: Path, clip: bytes, size: int) -> None:
    filler = size - len(clip) - 16
    block = os.urandom(BLOCK)
    with path.open("wb") as file:
        file.write(clip + struct.pack(">I4sQ", 1, b"free", 16 + filler))
        left = filler
        while left > 0:
            piece = block if left >= BLOCK else block[:left]
            file.write(piece)
            left -= len(piece)


def set_first_box(path: Path, box: bytes) -> None:
    """Name the file's first MP4 box: `ftyp` as made, or `junk`, which the probe reads past as well but from
    which the upload service cannot guess the master's name (so it streams to `incoming/` and copies)."""
    with path.open("r+b") as file:
        file.seek(4)
        file.write(box)


# -- the bare put (run as `bench/upload_s3.py bare BUCKET KEY FILE`, AWS_* in the environment) -------------


async def run_bare(bucket: str, key: str, path: Path) -> None:
    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, client_options={"allow_http": True})
    started = time.perf_counter()
    await obstore.put_async(store, key, path, chunk_size=PART_BYTES, max_concurrency=PART_CONCURRENCY)
    elapsed = time.perf_counter() - started
    print(json.dumps({"elapsed_s": elapsed, "peak_rss_mib": status_kib(os.getpid(), "VmHWM") / 1024}))


# -- the client (run as `bench/upload_s3.py client URL FILE`) -------------------------------------------


async def run_client(url: str, path: Path) -> None:
    import aiohttp

    async def body() -> AsyncIterator[bytes]:
        with path.open("rb") as file:
            while block := file.read(BLOCK):
                yield block

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        started = time.perf_counter()
        async with session.post(url, data=body(), headers={"Content-Type": "video/mp4"}) as response:
            answer = await response.text()
        elapsed = time.perf_counter() - started
    if response.status != 202:
        raise SystemExit(f"{url} answered {response.status}: {answer}")
    print(json.dumps({"elapsed_s": elapsed}))


# -- the driver -----------------------------------------------------------------------------------------


def run_json(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env={**os.environ, **env}, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{argv[2]} failed ({done.returncode}): {done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def children_cpu_s() -> float:
    """CPU seconds of this script's finished children (the bare put runs as one)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def median(values: list[float], digits: int = 2) -> float:
    return round(statistics.median(values), digits)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib * 2**20
    gib = size / 2**30
    sys.path.insert(0, str(REPO))
    import obstore
    from obstore.store import S3Store

    from tests.media import make_clip
    from tests.s3 import CLIENT, new_bucket, throwaway_seaweedfs

    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "size_mib": args.size_mib,
    }
    with tempfile.TemporaryDirectory(dir=REPO) as scratch, throwaway_seaweedfs() as server:
        assert server.pid is not None
        bucket = asyncio.run(new_bucket(server))
        big = Path(scratch, "big.mp4")
        make_file(big, make_clip(Path(scratch, "clip.mp4"), 320, 240, 2.0).read_bytes(), size)
        aws = {
            "AWS_ENDPOINT_URL": server.endpoint,
            "AWS_ACCESS_KEY_ID": server.app.access_key_id,
            "AWS_SECRET_ACCESS_KEY": server.app.secret_access_key,
            "AWS_REGION": server.config()["region"],
            "AWS_ALLOW_HTTP": "true",
        }
        admin = S3Store(bucket, config=server.config(server.admin), client_options=CLIENT)  # type: ignore[arg-type]

        def empty_bucket() -> None:  # only the disk space
            async def empty() -> None:
                async for batch in obstore.list(admin, None, chunk_size=1000):
                    await obstore.delete_async(admin, [meta["path"] for meta in batch])

            asyncio.run(empty())

        data = Path(scratch, "data")
        env = {
            **aws,
            "CATTUBE_DATA_DIR": str(data),
            "CATTUBE_LOG_LEVEL": "warning",
            "CATTUBE_BLOB_URL": f"s3://{bucket}/bench",
            "CATTUBE_ROUTER_URL": f"http://127.0.0.1:{free_port()}",  # down: events wait in the outbox
            "CATTUBE_RELAY_BACKOFF_MAX_S": "60",
        }
        port = free_port()
        bare_runs: list[dict[str, float]] = []
        upload_runs: dict[str, list[dict[str, float]]] = {"guessed": [], "copied": []}
        with serving([PY, "-m", "services.upload", "--port", str(port)], f"http://127.0.0.1:{port}", env) as upload:
            results["upload_idle_rss_mib"] = round(status_kib(upload.pid, "VmRSS") / 1024, 1)
            for _ in range(args.runs):
                weed_before, children_before = cpu_s(server.pid), children_cpu_s()
                bare = run_json([PY, str(Path(__file__)), "bare", bucket, "bare/big.mp4", str(big)], aws)
                bare["weed_cpu_s"] = cpu_s(server.pid) - weed_before
                bare["cpu_s"] = children_cpu_s() - children_before
                bare_runs.append(bare)
                empty_bucket()
                for variant, first_box in (("guessed", b"ftyp"), ("copied", b"junk")):
                    set_first_box(big, first_box)
                    weed_before, upload_before = cpu_s(server.pid), cpu_s(upload.pid, children=True)
                    with RssSampler(upload.pid) as sampler:
                        sent = run_json([PY, str(Path(__file__)), "client", f"{upload.url}/videos", str(big)], {})
                    sent["weed_cpu_s"] = cpu_s(server.pid) - weed_before
                    sent["cpu_s"] = cpu_s(upload.pid, children=True) - upload_before
                    sent["rss_during_mib"] = sampler.max_kib / 1024
                    upload_runs[variant].append(sent)
                    empty_bucket()
                set_first_box(big, b"ftyp")
            results["upload_peak_rss_mib"] = round(status_kib(upload.pid, "VmHWM") / 1024, 1)

    bare_s = median([r["elapsed_s"] for r in bare_runs])
    results["bare_put"] = {
        "elapsed_s": bare_s,
        "mib_per_s": round(args.size_mib / bare_s, 1),
        "peak_rss_mib": median([r["peak_rss_mib"] for r in bare_runs], 1),
        "cpu_s_per_gib": median([r["cpu_s"] / gib for r in bare_runs]),
        "seaweedfs_cpu_s_per_gib": median([r["weed_cpu_s"] / gib for r in bare_runs]),
        "runs_s": [round(r["elapsed_s"], 2) for r in bare_runs],
    }
    for variant, runs in upload_runs.items():
        elapsed_s = median([r["elapsed_s"] for r in runs])
        results[f"upload_{variant}"] = {
            "elapsed_s": elapsed_s,
            "mib_per_s": round(args.size_mib / elapsed_s, 1),
            "time_ratio_to_bare": round(elapsed_s / bare_s, 2),
            "ratios_per_run": [round(r["elapsed_s"] / b["elapsed_s"], 2) for r, b in zip(runs, bare_runs, strict=True)],
            "service_cpu_s_per_gib": median([r["cpu_s"] / gib for r in runs]),
            "seaweedfs_cpu_s_per_gib": median([r["weed_cpu_s"] / gib for r in runs]),
            "rss_while_streaming_mib": round(max(r["rss_during_mib"] for r in runs), 1),
            "runs_s": [round(r["elapsed_s"], 2) for r in runs],
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "bare":
        asyncio.run(run_bare(sys.argv[2], sys.argv[3], Path(sys.argv[4])))
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        asyncio.run(run_client(sys.argv[2], Path(sys.argv[3])))
    else:
        main()
