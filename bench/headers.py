"""The header attack of issue 10: N connections each send a huge header that never ends.

Reports the router's resident memory before and after, and what each connection was answered.
`--plain` runs the router under uvicorn's own httptools protocol (no header limit), as before the
limits of services/common/connections.py:

    python bench/headers.py            # the router as `python -m router` runs it
    python bench/headers.py --plain    # uvicorn without the limits
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from harness import free_port, serving

PLAIN = (
    "import sys, uvicorn; from router.app import create_app; from router.settings import RouterSettings;"
    "uvicorn.run(create_app(RouterSettings()), port=int(sys.argv[1]), http='httptools', log_level='warning')"
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def attack(port: int, mb: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunk = b"a" * (1024 * 1024)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(mb):
            writer.write(chunk)
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(200), 5)
        return answer.split(b"\r\n", 1)[0].decode() or "closed"
    except (ConnectionError, TimeoutError) as exc:
        return type(exc).__name__
    finally:
        writer.close()


async def main_async(pid: int, port: int, connections: int, mb: int) -> None:
    before = rss_mb(pid)
    peak = before

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    answers = await asyncio.gather(*(attack(port, mb) for _ in range(connections)))
    watcher.cancel()
    print(f"RSS before {before:.0f} MB, peak {peak:.0f} MB, after {rss_mb(pid):.0f} MB")
    print("answers:", sorted(set(answers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plain", action="store_true", help="uvicorn without the limits")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--mb", type=int, default=100, help="header bytes each connection sends, in MB")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        env = {"CATTUBE_DATA_DIR": data, "CATTUBE_ROUTER_PORT": str(port)}
        argv = [sys.executable, "-c", PLAIN, str(port)] if args.plain else [sys.executable, "-m", "router"]
        with serving(argv, f"http://127.0.0.1:{port}", env) as server:
            asyncio.run(main_async(server.pid, port, args.connections, args.mb))


if __name__ == "__main__":
    main()
