"""Router benchmark: durable publish against a bare endpoint, batched publish, queue receive + ack.

    .venv/bin/python bench/router.py [--duration 10]
    .venv/bin/python bench/router.py --database postgres [--replicas 2]   # a throwaway PostgreSQL
    .venv/bin/python bench/router.py --database postgresql://user:pw@host/db [--replicas 2]
    .venv/bin/python bench/router.py --engines                            # SQLite, PostgreSQL x1, x2

`--database postgres` starts a PostgreSQL of its own (tests/postgres.py's throwaway server: Debian's
server, fsync on) for the run; a URL uses that server, creating a fresh database in it per run. With
`--replicas N` the routers share that database and every load is spread over all of them.

Starts the router and, in the same script, a bare FastAPI endpoint that only answers 202, both
under uvicorn; drives both with the same aiohttp load generator in its own process (plain httpx
would measure the client, see bench/README.md), and prints ratios against the baseline, because this
machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
from harness import Server, cpu_s, free_port, serving

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
sys.path.insert(0, str(REPO))

from tests.postgres import database_url, throwaway_postgres  # noqa: E402


@dataclass
class Postgres:
    """The database a run's routers share, and the server's processes, for its CPU and commits."""

    url: str
    postmaster: int

    def write_xids(self) -> int:
        """The next transaction id: its delta counts write transactions, exactly and at once (the
        statistics views lag by up to a second)."""
        return int(asyncio.run(_fetchval(self.url, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")))

    def cpu_s(self) -> float:
        """CPU seconds of the server's live processes (postmaster and its children: backends, WAL writer, ...)."""
        if not self.postmaster:
            return 0.0
        total = cpu_s(self.postmaster)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.postmaster:
                    total += cpu_s(int(stat.parent.name))
            except (OSError, ValueError):
                continue
        return total


async def _fetchval(url: str, query: str) -> object:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(query)
    finally:
        await connection.close()


async def _postmaster(url: str) -> int:
    """The server's main process, the parent of our backend (read while the backend lives); 0 if the server
    is on another machine (no CPU figure then)."""
    connection = await asyncpg.connect(url)
    try:
        backend = await connection.fetchval("SELECT pg_backend_pid()")
        try:
            return int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])  # noqa: ASYNC240
        except OSError:
            return 0
    finally:
        await connection.close()


@contextmanager
def postgres_database(server_url: str) -> Iterator[Postgres]:
    """A fresh database on the server for one run, dropped afterwards."""
    name = f"cattube_bench_{secrets.token_hex(6)}"
    asyncio.run(_fetchval(server_url, f'CREATE DATABASE "{name}"'))
    postmaster = asyncio.run(_postmaster(server_url))
    try:
        yield Postgres(database_url(server_url, name), postmaster)
    finally:
        asyncio.run(_fetchval(server_url, f'DROP DATABASE "{name}" WITH (FORCE)'))


@dataclass
class Routers:
    """One or more routers on one database; loads are spread evenly over them."""

    servers: list[Server]
    postgres: Postgres | None = None
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def cpu_s(self) -> float:
        return sum(cpu_s(server.pid) for server in self.servers)


@contextmanager
def routers(database: str | None, replicas: int, durability: str) -> Iterator[Routers]:
    """`database` None: one router on SQLite in a temporary directory; else PostgreSQL's URL."""
    with ExitStack() as stack:
        data = stack.enter_context(tempfile.TemporaryDirectory())
        env = {"CATTUBE_DATA_DIR": data, "CATTUBE_LOG_LEVEL": "warning", "CATTUBE_ROUTER_DURABILITY": durability}
        postgres = None
        if database is not None:
            postgres = stack.enter_context(postgres_database(database))
            env["CATTUBE_ROUTER_DATABASE_URL"] = postgres.url
        servers = []
        for n in range(replicas):
            port = free_port()
            replica_env = {**env, "CATTUBE_DATA_DIR": f"{data}/{n}"}
            servers.append(
                stack.enter_context(
                    serving([PY, "-m", "router", "--port", str(port)], f"http://127.0.0.1:{port}", replica_env)
                )
            )
        yield Routers(servers, postgres)


def load(*args: str) -> dict[str, float]:
    out = subprocess.run([PY, str(HERE / "loadgen.py"), *args], check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out)
    return result


def spread(urls: list[str], path: str, *args: str, concurrency: int, count: int | None = None) -> dict[str, float]:
    """One load generator per router, the clients (and a consume's count) split evenly, run at once;
    the figures summed."""
    share = [str(max(1, concurrency // len(urls)))]
    procs = []
    for url in urls:
        extra = ["--count", str(count // len(urls))] if count is not None else []
        procs.append(
            subprocess.Popen(
                [PY, str(HERE / "loadgen.py"), args[0], url + path, *args[1:], "--concurrency", *share, *extra],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        out = proc.communicate()[0]
        if proc.returncode != 0:
            raise RuntimeError(f"load generator failed: {proc.args}")
        results.append(json.loads(out))
    total: dict[str, float] = {}
    for key in ("events_per_s", "requests_per_s", "messages_per_s", "received", "requests"):
        if key in results[0]:
            total[key] = sum(r[key] for r in results)
    for key in ("elapsed_s", "p50_ms", "p99_ms"):
        if key in results[0]:
            total[key] = max(r[key] for r in results)
    return total


def measured(target: Routers, path: str, *args: str, concurrency: int, count: int | None = None) -> dict[str, float]:
    """A spread load, with the routers' CPU per event (and per request), and on PostgreSQL the server's CPU
    per event and its write transactions (commits) per second."""
    cpu_before = target.cpu_s()
    pg = target.postgres
    xid_before, pg_cpu_before = (pg.write_xids(), pg.cpu_s()) if pg else (0, 0.0)
    started = time.perf_counter()
    result = spread(target.urls, path, *args, concurrency=concurrency, count=count)
    wall = time.perf_counter() - started
    xid_after, pg_cpu_after = (pg.write_xids(), pg.cpu_s() if pg.postmaster else 0.0) if pg else (0, 0.0)
    cpu = target.cpu_s() - cpu_before
    if "received" in result:
        events = result["received"]
        requests = result["requests"]
    else:
        events = result["events_per_s"] * result["elapsed_s"]
        requests = result["requests_per_s"] * result["elapsed_s"]
    result["router_cpu_us_per_event"] = round(cpu / events * 1e6, 1)
    result["router_cpu_us_per_request"] = round(cpu / requests * 1e6, 1)
    if pg:
        result["commits_per_s"] = round((xid_after - xid_before) / wall)
        result["events_per_commit"] = round(events / max(1, xid_after - xid_before), 2)
        if pg.postmaster:
            result["postgres_cpu_us_per_event"] = round((pg_cpu_after - pg_cpu_before) / events * 1e6, 1)
    return result


def push_bench(target: Routers, duration: str) -> dict[str, object]:
    """Push latency at 1,000 events/s, and the highest sustained push rate to one consumer."""
    out: dict[str, object] = {}
    first = target.urls[0]
    rate, seconds = float(os.environ.get("PUSH_RATE", "1000")), float(duration)
    count = int(rate / len(target.urls)) * len(target.urls) * int(seconds)
    receiver_port = free_port()
    receiver = subprocess.Popen(
        [PY, str(HERE / "receiver.py"), str(receiver_port), str(count)], stdout=subprocess.PIPE, text=True
    )
    time.sleep(1)
    target_url = {"url": f"http://127.0.0.1:{receiver_port}/hook"}
    httpx.put(f"{first}/subscriptions/latency", json={"pattern": {"type": ["bench.paced"]}, "target": target_url})
    share = str(int(rate / len(target.urls)))
    pacers = [
        subprocess.Popen(
            [PY, str(HERE / "loadgen.py"), "paced", url + "/events", "--rate", share, "--duration", str(int(seconds))],
            stdout=subprocess.DEVNULL,
        )
        for url in target.urls
    ]
    for pacer in pacers:
        pacer.wait()
    out["latency_at_1000_per_s"] = json.loads(receiver.communicate(timeout=120)[0])
    httpx.delete(f"{first}/subscriptions/latency")

    # Throughput: a backlog published first, then a new subscription drains it from the start.
    backlog = 30_000
    published = 0
    while published < backlog:
        step = spread(target.urls, "/events", "publish", "--batch", "100", "--duration", "1", concurrency=4)
        published += int(step["events_per_s"] * step["elapsed_s"] + 0.5)
    receiver_port = free_port()
    receiver = subprocess.Popen(
        [PY, str(HERE / "receiver.py"), str(receiver_port), str(published)], stdout=subprocess.PIPE, text=True
    )
    time.sleep(1)
    before = target.cpu_s()
    pg = target.postgres
    xid_before, pg_cpu_before = (pg.write_xids(), pg.cpu_s()) if pg else (0, 0.0)
    started = time.perf_counter()
    httpx.put(
        f"{first}/subscriptions/drain",
        json={
            "pattern": {"type": ["bench.event"]},
            "target": {"url": f"http://127.0.0.1:{receiver_port}/hook"},
            "delivery": {"max_in_flight": 16},
            "start": "earliest",
        },
        timeout=120,
    )
    drained = json.loads(receiver.communicate(timeout=600)[0])
    drained["router_cpu_us_per_event"] = round((target.cpu_s() - before) / published * 1e6, 1)
    if pg:
        wall = time.perf_counter() - started
        xids = pg.write_xids() - xid_before
        drained["commits_per_s"] = round(xids / wall)
        drained["events_per_commit"] = round(published / max(1, xids), 2)
        drained["postgres_cpu_us_per_event"] = round((pg.cpu_s() - pg_cpu_before) / published * 1e6, 1)
    out["sustained_max_in_flight_16"] = drained
    return out


def router_bench(
    database: str | None, replicas: int, durability: str, duration: str, *, requests_only: bool = False
) -> dict[str, object]:
    results: dict[str, object] = {"database": "postgresql" if database else "sqlite", "replicas": replicas}
    with routers(database, replicas, durability) as target:
        first = target.urls[0]
        httpx.put(f"{first}/subscriptions/bench", json={"pattern": {"source": ["bench"]}, "target": {"queue": {}}})
        httpx.put(f"{first}/subscriptions/other", json={"pattern": {"source": ["nope"]}, "target": {"queue": {}}})
        spread(target.urls, "/events", "publish", "--duration", "2", concurrency=16)  # warm-up
        results["single"] = measured(target, "/events", "publish", "--duration", duration, concurrency=16)
        if requests_only:
            results["receive_ack"] = measured(
                target, "", "consume", "--subscription", "bench", concurrency=4, count=50_000
            )
            return results
        results["batched_100"] = measured(
            target, "/events", "publish", "--batch", "100", "--duration", duration, concurrency=4
        )
        results["receive_ack"] = measured(target, "", "consume", "--subscription", "bench", concurrency=4, count=50_000)
        results["push"] = push_bench(target, duration)
    return results


def bare_bench(duration: str) -> dict[str, float]:
    bare_port = free_port()
    with serving([PY, str(HERE / "bare.py"), str(bare_port)], f"http://127.0.0.1:{bare_port}") as bare_server:
        url = bare_server.url
        load("publish", url + "/events", "--duration", "2")  # warm-up
        before = cpu_s(bare_server.pid)
        result = load("publish", url + "/events", "--concurrency", "16", "--duration", duration)
        requests = result["requests_per_s"] * result["elapsed_s"]
        result["server_cpu_us_per_request"] = round((cpu_s(bare_server.pid) - before) / requests * 1e6, 1)
    return result


@contextmanager
def postgres_server(database: str) -> Iterator[str]:
    """`postgres`: a throwaway server for the run; anything else is a running server's URL."""
    if database == "postgres":
        with throwaway_postgres() as url:
            yield url
    else:
        yield database


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--durability", default="fsync", choices=["fsync", "batched"], help="CATTUBE_ROUTER_DURABILITY")
    parser.add_argument(
        "--only", choices=["push", "requests"], help="run one part alone; requests: bare, single publish, receive + ack"
    )
    parser.add_argument(
        "--database", default="sqlite", help="sqlite (default), postgres (start one), or postgresql://... (use it)"
    )
    parser.add_argument("--replicas", type=int, default=1, help="routers on the one PostgreSQL database")
    parser.add_argument(
        "--engines", action="store_true", help="SQLite, then PostgreSQL with 1 and 2 replicas, in one sitting"
    )
    args = parser.parse_args()
    duration = str(args.duration)
    if args.database != "sqlite" and not args.database.startswith("postgres"):
        parser.error("--database: expected sqlite, postgres or a postgresql:// URL")
    if args.replicas > 1 and args.database == "sqlite" and not args.engines:
        parser.error("--replicas: several routers need PostgreSQL (--database postgres or a URL)")
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_before": os.getloadavg(),
    }
    if args.only == "push":
        with ExitStack() as stack:
            url = None if args.database == "sqlite" else stack.enter_context(postgres_server(args.database))
            with routers(url, args.replicas, args.durability) as target:
                results["push"] = push_bench(target, duration)
        print(json.dumps(results, indent=2))
        return
    results["bare_single"] = bare_bench(duration)
    with ExitStack() as stack:
        server = None
        if args.engines or args.database != "sqlite":
            server = stack.enter_context(postgres_server("postgres" if args.engines else args.database))
        if args.engines:
            runs = [(None, 1), (server, 1), (server, 2)]
        else:
            runs = [(server, args.replicas)]
        for database, replicas in runs:
            name = f"{'postgresql' if database else 'sqlite'}_x{replicas}"
            results[name] = router_bench(
                database, replicas, args.durability, duration, requests_only=args.only == "requests"
            )
            results[name + "_load_average_after"] = os.getloadavg()
            print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
