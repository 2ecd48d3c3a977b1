"""The servers under test, each started on free loopback ports in a directory of its own, and stopped by pid.

- NATS: JetStream with file storage (its default: fsync every 2 minutes).
- Redis: append-only file, `appendfsync everysec`, no RDB snapshots.
- RabbitMQ: a node of its own (name, Mnesia directory, Erlang cookie, epmd port), no plugins; it needs
  Erlang and takes seconds to boot, so it is waited on until it logs that start-up is complete.
- CatTube: `python -m router` with a temporary DATA_DIR and the environment of a durability setting.
- The floor: the router's API in memory (bench/peers/floor.py), under the same uvicorn.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.harness import REPO, free_port
from bench.peers.install import binary
from bench.peers.processes import ServerProcess


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    process: ServerProcess

    @property
    def pid(self) -> int:
        return self.process.pid


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@asynccontextmanager
async def running(process: ServerProcess, name: str, url: str, ready: str, timeout_s: float) -> AsyncIterator[Server]:
    try:
        await process.start(ready, timeout_s)
        yield Server(name, url, process)
    finally:
        await process.stop()


def nats_server(workdir: Path) -> AbstractAsyncContextManager[Server]:
    port = free_port()
    conf = _write(
        workdir / "nats.conf",
        f'listen: "127.0.0.1:{port}"\nserver_name: bench\njetstream {{\n  store_dir: "{workdir / "jetstream"}"\n}}\n',
    )
    argv = [binary("nats-server") or "nats-server", "-c", str(conf)]
    process = ServerProcess("nats-server", argv, workdir / "nats.log", env=dict(os.environ), cwd=workdir)
    return running(process, "nats", f"nats://127.0.0.1:{port}", "Server is ready", 30)


def redis_server(workdir: Path) -> AbstractAsyncContextManager[Server]:
    port = free_port()
    argv = [binary("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", str(port)]
    argv += ["--dir", str(workdir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    argv += ["--daemonize", "no", "--logfile", ""]
    process = ServerProcess("redis-server", argv, workdir / "redis.log", env=dict(os.environ), cwd=workdir)
    return running(process, "redis", f"redis://127.0.0.1:{port}", "Ready to accept connections", 30)


@asynccontextmanager
async def rabbitmq_server(workdir: Path) -> AsyncIterator[Server]:
    """A RabbitMQ node of its own, with its own epmd (started here, so it is ours to stop)."""
    amqp_port, epmd_port, dist_port = free_port(), free_port(), free_port()
    home = workdir / "home"  # the Erlang cookie goes to $HOME: this node's, not the user's
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "ERL_EPMD_PORT": str(epmd_port),
        "RABBITMQ_NODENAME": f"bench{amqp_port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(amqp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(workdir / "log"),
        "RABBITMQ_LOGS": "-",  # to standard output, where start-up completion is read
        "RABBITMQ_PID_FILE": str(workdir / "rabbitmq.pid"),
        "RABBITMQ_CONF_ENV_FILE": str(_write(workdir / "rabbitmq-env.conf", "")),  # not /etc/rabbitmq's
        "RABBITMQ_CONFIG_FILE": str(_write(workdir / "rabbitmq.conf", f"listeners.tcp.1 = 127.0.0.1:{amqp_port}\n")),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(_write(workdir / "enabled_plugins", "[].\n")),
    }
    epmd_argv = [shutil.which("epmd") or "epmd", "-d", "-port", str(epmd_port), "-address", "127.0.0.1"]
    epmd = ServerProcess("epmd", epmd_argv, workdir / "epmd.log", env=env, cwd=workdir)
    rabbit_argv = [binary("rabbitmq-server") or "rabbitmq-server"]
    rabbit = ServerProcess("rabbitmq-server", rabbit_argv, workdir / "rabbitmq.log", env=env, cwd=workdir)
    async with running(epmd, "epmd", f"epmd://127.0.0.1:{epmd_port}", "epmd running", 10):
        # Erlang boots, then RabbitMQ's boot steps run: on a loaded 2-core machine this takes 5 to 30 s.
        async with running(
            rabbit, "rabbitmq", f"amqp://guest:guest@127.0.0.1:{amqp_port}/", "Server startup complete", 180
        ) as server:
            yield server


@dataclass(frozen=True)
class Durability:
    """A CatTube router setting to measure under: a label for the table and the environment that makes it."""

    label: str
    env: Mapping[str, str]


DURABILITIES = {
    "fsync": Durability("fsync", {}),  # the router's default: every 202 survives power loss
    # Survives a crash of the router at once, power loss within a second (like Redis's appendfsync everysec).
    "batched": Durability("batched", {"CATTUBE_ROUTER_DURABILITY": "batched"}),
    # What routers before the durability modes called it (CATTUBE_SQLITE_SYNCHRONOUS=NORMAL, batched's alias now).
    "normal": Durability("normal", {"CATTUBE_SQLITE_SYNCHRONOUS": "NORMAL"}),
}


def durability(text: str) -> Durability:
    """`fsync`, `batched`, `normal`, or `KEY=VALUE[;KEY=VALUE...]` for a setting this script does not know by name."""
    if text in DURABILITIES:
        return DURABILITIES[text]
    pairs = [item.partition("=") for item in text.split(";") if item]
    if not pairs or any(not key or not sep for key, sep, _ in pairs):
        raise ValueError(f"expected one of {', '.join(DURABILITIES)} or KEY=VALUE[;KEY=VALUE], got {text!r}")
    return Durability(text, {key: value for key, _, value in pairs})


def cattube_router(workdir: Path, setting: Durability, database_url: str | None) -> AbstractAsyncContextManager[Server]:
    port = free_port()
    data = workdir / "data"
    data.mkdir()
    env = {**os.environ, "CATTUBE_DATA_DIR": str(data), "CATTUBE_LOG_LEVEL": "info", **setting.env}
    if database_url:
        env["CATTUBE_ROUTER_DATABASE_URL"] = database_url
    argv = [sys.executable, "-m", "router", "--port", str(port)]
    process = ServerProcess(f"router ({setting.label})", argv, workdir / "router.log", env=env, cwd=REPO)
    return running(process, f"cattube-{setting.label}", f"http://127.0.0.1:{port}", "Application startup complete", 60)


def floor_server(workdir: Path) -> AbstractAsyncContextManager[Server]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.peers.floor", str(port)]
    process = ServerProcess("floor", argv, workdir / "floor.log", env=dict(os.environ), cwd=REPO)
    return running(process, "floor", f"http://127.0.0.1:{port}", "Application startup complete", 60)


def peer_server(kind: str, workdir: Path) -> AbstractAsyncContextManager[Server]:
    """Start the server of `kind` (nats, redis, rabbitmq or floor) in `workdir`, a directory of its own."""
    starts: dict[str, Callable[[Path], AbstractAsyncContextManager[Server]]] = {
        "nats": nats_server,
        "redis": redis_server,
        "rabbitmq": rabbitmq_server,
        "floor": floor_server,
    }
    workdir.mkdir()
    return starts[kind](workdir)
