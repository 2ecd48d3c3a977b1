"""`python -m bench.peers`: CatTube against NATS JetStream, Redis Streams and RabbitMQ (issue 14's method).

    .venv/bin/python -m bench.peers                         # everything: 20,000 events, 3 runs each
    .venv/bin/python -m bench.peers --events 2000 --runs 1  # a quick look
    .venv/bin/python -m bench.peers --systems cattube-sdk,nats --modes one --durability fsync --durability batched
    .venv/bin/python -m bench.peers --database postgresql://...  # the router on another store

Prints a Markdown table (and with --json, writes every run's numbers). Runs are interleaved (each
run goes through every system before the next run starts), so a noisy moment hits all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from bench.harness import REPO
from bench.peers.install import SERVER_PACKAGES, ensure_clients, ensure_servers
from bench.peers.processes import tree_cpu_s
from bench.peers.report import Column, render
from bench.peers.servers import DURABILITIES, Durability, Server, cattube_router, durability, peer_server
from bench.peers.side import MODES
from bench.peers.systems import SYSTEMS

SIDE = [sys.executable, "-m", "bench.peers.side"]


class RunFailed(Exception):
    pass


def _names(choices: dict[str, Any]) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if unknown := [n for n in names if n not in choices]:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; expected some of {', '.join(choices)}")
        return names

    return parse


def _durability(text: str) -> Durability:
    try:
        return durability(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", type=_names(SYSTEMS), default=list(SYSTEMS), help=",".join(SYSTEMS))
    parser.add_argument("--modes", type=_names(MODES), default=list(MODES), help=",".join(MODES))
    parser.add_argument("--events", type=int, default=20_000, help="events per run (default 20,000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per system and mode; the table shows medians")
    parser.add_argument(
        "--durability",
        type=_durability,
        action="append",
        help=f"CatTube router setting, repeatable: {', '.join(DURABILITIES)} (default fsync) or KEY=VALUE[;KEY=VALUE]",
    )
    parser.add_argument("--database", help="the router's database URL (CATTUBE_ROUTER_DATABASE_URL)")
    parser.add_argument("--window", type=int, default=100, help="unacked messages a consumer holds (prefetch)")
    parser.add_argument("--timeout-s", type=float, help="bound on one run (default 120 s + 50 ms per event)")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    args = parser.parse_args()
    args.durability = args.durability or [DURABILITIES["fsync"]]
    args.timeout_s = args.timeout_s or 120 + args.events * 0.05
    return args


def columns_for(args: argparse.Namespace) -> list[Column]:
    columns = []
    for name in args.systems:
        system = SYSTEMS[name]
        if system.server != "cattube":
            columns.append(Column(system.title, name, system.server, cattube=False))
            continue
        for setting in args.durability:
            named = len(args.durability) > 1 or setting.label != "fsync"
            title = f"{system.title} ({setting.label})" if named else system.title
            columns.append(Column(title, name, f"cattube:{setting.label}", cattube=True))
    return columns


async def start_servers(stack: AsyncExitStack, columns: list[Column], args: argparse.Namespace) -> dict[str, Server]:
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cattube-peers-")))
    servers: dict[str, Server] = {}
    for key in dict.fromkeys(c.server for c in columns):
        print(f"starting {key}", file=sys.stderr)
        if key.startswith("cattube:"):
            setting: Durability = next(d for d in args.durability if f"cattube:{d.label}" == key)
            home = workdir / f"router-{len(servers)}"
            home.mkdir()
            servers[key] = await stack.enter_async_context(cattube_router(home, setting, args.database))
        else:
            servers[key] = await stack.enter_async_context(peer_server(key, workdir / key))
    return servers


async def side_result(process: asyncio.subprocess.Process, timeout_s: float, who: str) -> dict[str, Any]:
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout_s)
    except TimeoutError:
        raise RunFailed(f"{who} gave no result within {timeout_s:.0f} s") from None
    if not line:
        raise RunFailed(f"{who} ended without a result (exit {await process.wait()}; its error is above)")
    result: dict[str, Any] = json.loads(line)
    return result


async def end(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()


async def one_run(column: Column, server: Server, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One producer and one consumer process through `column`'s system: every number of one run."""
    name = f"peers-{uuid.uuid4().hex[:12]}"
    common = [column.system, server.url, name, "--events", str(args.events), "--window", str(args.window)]
    load = os.getloadavg()[0]
    consumer = await asyncio.create_subprocess_exec(
        *SIDE, "consume", *common, "--timeout-s", str(args.timeout_s), cwd=REPO, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    producer: asyncio.subprocess.Process | None = None
    try:
        try:
            ready = await asyncio.wait_for(consumer.stdout.readline(), 120) if consumer.stdout else b""
        except TimeoutError:
            raise RunFailed("the consumer was not ready within 120 s") from None
        if ready.strip() != b"ready":
            raise RunFailed(f"the consumer did not start (exit {await consumer.wait()}; its error is above)")
        cpu = tree_cpu_s(server.pid)
        producer = await asyncio.create_subprocess_exec(
            *SIDE, "produce", *common, "--mode", mode, cwd=REPO, stdout=asyncio.subprocess.PIPE
        )
        produced = await side_result(producer, args.timeout_s + 30, "the producer")
        consumed = await side_result(consumer, args.timeout_s + 30, "the consumer")
        cpu = tree_cpu_s(server.pid) - cpu
        assert consumer.stdin is not None
        try:
            consumer.stdin.write(b"remove\n")
            await consumer.stdin.drain()
            await asyncio.wait_for(consumer.wait(), 60)
        except (OSError, TimeoutError) as exc:  # the numbers stand; only the clean-up failed
            print(f"the consumer of {name} did not remove it: {exc!r}", file=sys.stderr)
    finally:
        for process in (producer, consumer):
            if process is not None:
                await end(process)
    acked, start = consumed["acked"], produced["first_publish"]
    complete = acked >= args.events and consumed["last_ack"] is not None
    return {
        "complete": complete,
        "acked": acked,
        "delivered": consumed["delivered"],
        "e2e_per_s": acked / (consumed["last_ack"] - start) if complete else None,
        "publish_per_s": produced["published"] / (produced["last_confirm"] - start),
        "p50_ms": consumed["p50_ms"],
        "p99_ms": consumed["p99_ms"],
        "server_cpu_us": cpu / max(acked, 1) * 1e6,
        "producer_cpu_us": produced["cpu_s"] / args.events * 1e6,
        "consumer_cpu_us": consumed["cpu_s"] / max(acked, 1) * 1e6,
        "load_1m": load,
    }


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _save(path: Path | None, host: dict[str, Any], columns: list[Column]) -> None:
    if path:
        path.write_text(json.dumps({"host": host, "columns": [c.__dict__ for c in columns]}, indent=2))


async def measure(
    columns: list[Column], servers: dict[str, Server], args: argparse.Namespace, host: dict[str, Any]
) -> None:
    for mode in args.modes:
        for n in range(args.runs):
            for column in columns:
                started = time.monotonic()
                try:
                    result = await one_run(column, servers[column.server], mode, args)
                except RunFailed as exc:
                    result = {"error": str(exc), "load_1m": os.getloadavg()[0]}
                column.runs.setdefault(mode, []).append(result)
                _save(args.json, host, columns)  # after every run: a long benchmark that is stopped keeps its numbers
                summary = result.get("error") or (
                    f"{result['e2e_per_s'] or 0:,.0f} ev/s e2e, p50 {result['p50_ms'] or 0:.2f} ms, "
                    f"server {result['server_cpu_us']:,.0f} µs/event, acked {result['acked']:,}"
                )
                took = time.monotonic() - started
                print(f"{mode} run {n + 1}/{args.runs} {column.title}: {summary} ({took:.0f} s)", file=sys.stderr)


async def run(args: argparse.Namespace) -> str:
    columns = columns_for(args)
    host: dict[str, Any] = {
        "events": args.events,
        "runs": args.runs,
        "window": args.window,
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}",
        "cpus": os.cpu_count(),
        "load_start": _load(),
        "started": time.strftime("%Y-%m-%d %H:%M"),
    }
    try:
        async with AsyncExitStack() as stack:
            servers = await start_servers(stack, columns, args)
            await measure(columns, servers, args, host)
    except asyncio.CancelledError:
        # Stopped (Ctrl-C, SIGTERM) once every server is down: show what was measured, then stop.
        if any(c.runs for c in columns):
            host.update(load_end=_load(), ended=time.strftime("%H:%M"))
            _save(args.json, host, columns)
            print(render(columns, [m for m in args.modes if any(m in c.runs for c in columns)], host), flush=True)
            print("\n(interrupted: only the runs above were measured)", flush=True)
        raise
    host.update(load_end=_load(), ended=time.strftime("%H:%M"))
    _save(args.json, host, columns)
    return render(columns, args.modes, host)


async def main(args: argparse.Namespace) -> str:
    # SIGTERM unwinds like Ctrl-C does, so every server is stopped on the way out.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run(args)


if __name__ == "__main__":
    arguments = parse_args()
    needed = {SYSTEMS[s].server for s in arguments.systems} - {"cattube", "floor"}
    ensure_servers({SERVER_PACKAGES[kind] for kind in needed})
    ensure_clients({m for s in arguments.systems for m in SYSTEMS[s].client_modules})
    try:
        print(asyncio.run(main(arguments)))
    except (asyncio.CancelledError, KeyboardInterrupt):
        sys.exit("interrupted; every server it started was stopped")
