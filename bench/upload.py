"""Upload benchmark: a 2 GiB upload through the upload service against a bare endpoint that streams to disk.

    .venv/bin/python bench/upload.py [--size-mib 2048] [--runs 3]

The body is made on the fly and is a real video: a 2 s 320x240 H.264/AAC MP4 followed by an MP4
`free` box holding the rest of the bytes (filler every demuxer skips), so the upload service does
all its work: parse the multipart form (or take the raw body), hash and write to the bucket, probe
in its sandboxed child, give the master its final name, commit the record and its event to the
outbox (the router is down: the event stays pending, which costs nothing here). The baseline is a
bare FastAPI endpoint under the same uvicorn that writes the same body to a file with aiofiles and
fsyncs it, nothing else. Both are driven by an aiohttp client in its own process, one upload at a
time, alternating, and the script prints medians: throughput, the ratio upload/bare, each server's
CPU seconds per GiB, and the upload service's peak RSS (`VmHWM`, start-up included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request, Response
from harness import Server, cpu_s, free_port, serving

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
BLOCK = 1 << 20


def peak_rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0]) / 1024


# -- the bare endpoint (run as `bench/upload.py bare PORT DIR`) -------------------------------------


def run_bare(port: int, directory: str) -> None:
    import aiofiles
    import aiofiles.os
    import uvicorn

    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request) -> Response:
        path = Path(directory, secrets.token_hex(8))
        async with aiofiles.open(path, "wb") as file:
            async for chunk in request.stream():
                await file.write(chunk)
            await file.flush()
            await aiofiles.os.wrap(os.fsync)(file.fileno())
        await aiofiles.os.remove(path)  # only the disk space: the bytes were written and synced
        return Response(status_code=202)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- the client (run as `bench/upload.py client URL CLIP SIZE MODE`) --------------------------------


async def run_client(url: str, clip: bytes, size: int, mode: str) -> None:
    import aiohttp

    filler = size - len(clip) - 16
    block = os.urandom(BLOCK)
    boundary = secrets.token_hex(12)

    async def video() -> AsyncIterator[bytes]:
        yield clip + struct.pack(">I4sQ", 1, b"free", 16 + filler)
        left = filler
        while left > 0:
            piece = block if left >= BLOCK else block[:left]
            left -= len(piece)
            yield piece

    async def form() -> AsyncIterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="title"\r\n\r\nbench\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.mp4"\r\n'
            "Content-Type: video/mp4\r\n\r\n"
        ).encode()
        async for piece in video():
            yield piece
        yield f"\r\n--{boundary}--\r\n".encode()

    if mode == "multipart":
        body, content_type = form(), f"multipart/form-data; boundary={boundary}"
    else:
        body, content_type = video(), "video/mp4"
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        async with session.post(url, data=body, headers={"Content-Type": content_type}) as response:
            answer = await response.text()
        elapsed = time.perf_counter() - started
    if response.status != 202:
        raise SystemExit(f"{url} answered {response.status}: {answer}")
    print(json.dumps({"elapsed_s": elapsed, "bytes": size}))


# -- the driver -------------------------------------------------------------------------------------


def send(target: Server, path: str, clip: Path, size: int, mode: str) -> dict[str, float]:
    before = cpu_s(target.pid)
    argv = [PY, str(Path(__file__)), "client", target.url + path, str(clip), str(size), mode]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the client failed: {done.stderr}")
    result: dict[str, float] = json.loads(done.stdout)
    result["server_cpu_s"] = cpu_s(target.pid) - before
    return result


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    gib = runs[0]["bytes"] / 2**30
    return {
        "mib_per_s": round(statistics.median(r["bytes"] / r["elapsed_s"] / 2**20 for r in runs), 1),
        "elapsed_s": round(statistics.median(r["elapsed_s"] for r in runs), 2),
        "server_cpu_s_per_gib": round(statistics.median(r["server_cpu_s"] / gib for r in runs), 2),
        "runs_s": [round(r["elapsed_s"], 2) for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default="raw,multipart")
    args = parser.parse_args()
    size = args.size_mib * 2**20
    sys.path.insert(0, str(REPO))
    from tests.media import make_clip

    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "size_mib": args.size_mib,
    }
    with tempfile.TemporaryDirectory(dir=REPO) as scratch:
        clip = make_clip(Path(scratch, "clip.mp4"), 320, 240, 2.0)
        bare_dir = Path(scratch, "bare")
        bare_dir.mkdir()
        data = Path(scratch, "data")
        env = {
            "CATTUBE_DATA_DIR": str(data),
            "CATTUBE_LOG_LEVEL": "warning",
            "CATTUBE_ROUTER_URL": f"http://127.0.0.1:{free_port()}",  # down: events wait in the outbox
            "CATTUBE_RELAY_BACKOFF_MAX_S": "60",
        }
        bare_port, upload_port = free_port(), free_port()
        with (
            serving([PY, str(Path(__file__)), "bare", str(bare_port), str(bare_dir)], f"http://127.0.0.1:{bare_port}")
            as bare,
            serving([PY, "-m", "services.upload", "--port", str(upload_port)], f"http://127.0.0.1:{upload_port}", env)
            as upload,
        ):  # fmt: skip
            results["upload_idle_rss_mib"] = round(peak_rss_mib(upload.pid), 1)
            for mode in args.modes.split(","):
                bare_runs, upload_runs = [], []
                for _ in range(args.runs):
                    bare_runs.append(send(bare, "/upload", clip, size, mode))
                    upload_runs.append(send(upload, "/videos", clip, size, mode))
                    for master in (data / "bucket" / "videos").glob("*/master.*"):
                        master.unlink()  # only the disk space
                b, u = summary(bare_runs), summary(upload_runs)
                results[mode] = {"bare": b, "upload": u, "throughput_ratio": round(u["mib_per_s"] / b["mib_per_s"], 3)}
            results["upload_peak_rss_mib"] = round(peak_rss_mib(upload.pid), 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "bare":
        run_bare(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        asyncio.run(run_client(sys.argv[2], Path(sys.argv[3]).read_bytes(), int(sys.argv[4]), sys.argv[5]))
    else:
        main()
