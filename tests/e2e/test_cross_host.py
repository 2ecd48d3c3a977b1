"""CatTube on three hosts, each with an address of its own: network namespaces joined by a bridge.

Host 1 holds PostgreSQL and SeaweedFS; host 2 a router, the upload service and a processing
instance; host 3 a router, the store and another processing instance. Nothing is shared on disk:
every part reaches the others over the (machine-internal) network only. Clips go in through host 2
and come out through host 3; host 3's processing instance is `kill -9`-ed while it transcodes.

As root with `ip netns` available, the hosts are namespaces on a private bridge (10.77.N.0/24,
the root namespace holds .254 so the test can drive them); elsewhere they are distinct loopback
addresses (127.0.0.1-3), and the test says so in its output (CATTUBE_TEST_LOOPBACK_HOSTS=1 forces that).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, aclosing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from router.client import RouterClient
from services.cli import local_postgres, local_seaweedfs
from services.cli.local_seaweedfs import Identity
from services.cli.upload import live_changes
from services.common.s3_blobs import S3BlobStore
from services.processing.deletions import deletions_queue_name
from tests.e2e.test_stack import FINAL, until
from tests.media import make_clip
from tests.process import ServiceProcess, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BUCKET = "cattube"
CLIPS = 6
CUT_S = 4


@dataclass
class Hosts:
    """Three hosts: their addresses and, with namespaces, how to run a command on each."""

    addresses: tuple[str, str, str]
    subnet: str
    namespaces: tuple[str, str, str] | None = None
    """None: the hosts are loopback addresses of this machine's own namespace."""
    links: tuple[str, str, str] | None = None
    """Each host's end of the bridge (in the root namespace): down, the host is cut off."""

    def address(self, host: int) -> str:
        return self.addresses[host - 1]

    def set_link(self, host: int, state: str) -> None:
        assert self.links is not None
        _ip("link", "set", self.links[host - 1], state)

    def prefix(self, host: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[host - 1]] if self.namespaces else []


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL)


@contextmanager
def three_hosts() -> Iterator[Hosts]:
    """Namespaces h1..h3 on a bridge of their own (unique names per run), removed on exit; else loopback."""
    tag = f"ct{os.getpid() % 100_000}"
    net = f"10.77.{os.getpid() % 250}"
    bridge = f"{tag}br"
    names = (f"{tag}h1", f"{tag}h2", f"{tag}h3")
    made: list[str] = []
    try:
        try:
            if os.environ.get("CATTUBE_TEST_LOOPBACK_HOSTS"):  # to run the fallback where namespaces work
                raise OSError("CATTUBE_TEST_LOOPBACK_HOSTS is set")
            _ip("netns", "add", names[0])
        except (OSError, subprocess.CalledProcessError) as error:
            reason = (getattr(error, "stderr", None) or str(error)).strip()
            print(f"cross-host: network namespaces unavailable ({reason!s}); hosts are loopback 127.0.0.1-3")
            yield Hosts(("127.0.0.1", "127.0.0.2", "127.0.0.3"), "127.0.0.0/8")
            return
        made.append(names[0])
        for name in names[1:]:
            _ip("netns", "add", name)
            made.append(name)
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{net}.254/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for number, name in enumerate(names, start=1):
            _ip("link", "add", f"{tag}v{number}", "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("link", "set", f"{tag}v{number}", "master", bridge, "up")
            _ip("-n", name, "addr", "add", f"{net}.{number}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
        print(f"cross-host: three network namespaces {', '.join(names)} on {net}.0/24 (bridge {bridge})")
        links = (f"{tag}v1", f"{tag}v2", f"{tag}v3")
        yield Hosts((f"{net}.1", f"{net}.2", f"{net}.3"), f"{net}.0/24", names, links)
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)  # its veth goes too
        subprocess.run(["ip", "link", "del", bridge], check=False, capture_output=True)


def start_postgres(hosts: Hosts, home: Path, password: str, port: int) -> Path:
    """PostgreSQL on host 1's address, reachable from the test subnet with a password."""
    data = local_postgres.initdb(home / "postgres", password)
    with (data / "postgresql.conf").open("a") as conf:  # after initdb's loopback line, so it wins
        conf.write(f"listen_addresses = '{hosts.address(1)}'\n")
    with (data / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {hosts.subnet} scram-sha-256\n")
    log = home / "postgres" / "server.log"
    log.touch()
    local_postgres.hand_over(log)
    pg_ctl = str(local_postgres.server_bin_dir() / "pg_ctl")
    started = subprocess.run(
        [*hosts.prefix(1), *local_postgres.run_as(), pg_ctl, "start", "--wait", "--pgdata", str(data),
         "--log", str(log), "-o", f"-p {port}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert started.returncode == 0, started.stdout + started.stderr + log.read_text()
    return data


@dataclass
class Weed:
    proc: asyncio.subprocess.Process
    log: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None


async def start_seaweedfs(hosts: Hosts, home: Path, app: Identity, admin: Identity, s3_port: int) -> Weed:
    """`weed mini` bound to host 1's address; returns once its log names the S3 endpoint."""
    (home / "s3" / "data").mkdir(parents=True)
    identities = home / "s3" / "identities.json"
    local_seaweedfs.write_identities(identities, app, admin)
    ports = {flag: free_port() for flag in local_seaweedfs.PORT_FLAGS} | {"s3.port": s3_port}
    address = hosts.address(1)
    command = [
        {"-ip=127.0.0.1": f"-ip={address}", "-ip.bind=127.0.0.1": f"-ip.bind={address}"}.get(arg, arg)
        for arg in local_seaweedfs.command(home / "s3" / "data", identities, ports)
    ]
    proc = await asyncio.create_subprocess_exec(
        *hosts.prefix(1), *command, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    weed = Weed(proc)
    ready = asyncio.get_running_loop().create_future()

    async def read() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            weed.log.append(line)
            if local_seaweedfs.READY_LINE in line and not ready.done():
                ready.set_result(None)
        if not ready.done():
            ready.set_exception(RuntimeError("weed exited"))

    weed.reader = asyncio.create_task(read())
    try:
        await asyncio.wait_for(ready, 60)
    except BaseException:
        proc.kill()
        raise AssertionError("weed mini did not start:\n" + "\n".join(weed.log[-40:])) from None
    return weed


async def stop_seaweedfs(weed: Weed) -> None:
    if weed.proc.returncode is None:
        weed.proc.terminate()
        try:
            await asyncio.wait_for(weed.proc.wait(), 30)
        except TimeoutError:
            weed.proc.kill()
            await weed.proc.wait()
    if weed.reader is not None:
        await weed.reader


@dataclass
class Cluster:
    hosts: Hosts
    home: Path
    services: dict[str, ServiceProcess]
    bucket: S3BlobStore
    tokens: dict[str, str]

    def auth(self, scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[scope]}"}


def make_home() -> Path:
    # Not under pytest's tmp_path: as root PostgreSQL runs as `postgres`, which must reach its directory.
    home = Path(tempfile.mkdtemp(prefix="cattube-hosts-"))
    home.chmod(0o755)
    return home


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    home = make_home()
    postgres_data: Path | None = None
    with three_hosts() as hosts:
        async with AsyncExitStack() as stack:
            try:
                password = secrets.token_urlsafe(16)
                pg_port, s3_port = free_port(), free_port()
                postgres_data = start_postgres(hosts, home, password, pg_port)
                server = local_postgres.url(password, pg_port).replace("127.0.0.1", hosts.address(1))
                connection = await asyncpg.connect(server)
                await connection.execute("CREATE DATABASE cattube")
                await connection.close()
                app, admin = Identity.new("cattube"), Identity.new("admin")
                weed = await start_seaweedfs(hosts, home, app, admin, s3_port)
                stack.push_async_callback(stop_seaweedfs, weed)
                endpoint = f"http://{hosts.address(1)}:{s3_port}"
                await local_seaweedfs.create_bucket(endpoint, admin, BUCKET)

                tokens = {scope: secrets.token_urlsafe(16) for scope in ("admin", "service", "user")}
                # One port per kind of service: two of a kind are on different hosts, so on different addresses.
                ports = {kind: free_port() for kind in ("router", "upload", "processing", "store")}
                on = {"router-2": 2, "router-3": 3, "upload": 2, "processing-2": 2, "store": 3, "processing-3": 3}
                url = {name: f"http://{hosts.address(host)}:{ports[name.split('-')[0]]}" for name, host in on.items()}
                common = {
                    **local_seaweedfs.environment(endpoint, app),
                    "CATTUBE_DATABASE_URL": server.rsplit("/", 1)[0] + "/cattube",
                    "CATTUBE_BLOB_URL": f"s3://{BUCKET}",
                    "CATTUBE_ROUTER_URL": f"{url['router-2']},{url['router-3']}",
                    "CATTUBE_PUSH_ALLOWED_NETWORKS": f"127.0.0.0/8,{hosts.subnet}",
                    "CATTUBE_TOKEN": tokens["admin"],
                    "CATTUBE_SERVICE_TOKEN": tokens["service"],
                    "CATTUBE_USER_TOKEN": tokens["user"],
                    "CATTUBE_STORE_PUBLIC_URL": url["store"],
                    "CATTUBE_UPLOAD_PUBLIC_URL": url["upload"],
                    "CATTUBE_LOG_LEVEL": "info",
                    "CATTUBE_MAX_WORKERS": "1",
                    "CATTUBE_SCALE_IN_COOLDOWN_S": "1",
                    # A job whose worker died comes back this soon (it is extended every third of it while alive).
                    "CATTUBE_VISIBILITY_TIMEOUT_S": "6",
                }
                modules = {"router": "router", "upload": "services.upload", "processing": "services.processing",
                           "store": "services.store"}  # fmt: skip
                services: dict[str, ServiceProcess] = {}
                for name, host in on.items():  # the routers first: the services subscribe at start
                    kind = name.split("-")[0]
                    env = {**common, "CATTUBE_HOST": hosts.address(host), "CATTUBE_DATA_DIR": str(home / name)}
                    if kind == "processing":
                        env["CATTUBE_INSTANCE"] = name
                    process = ServiceProcess(modules[kind], ports[kind], env, hosts.address(host), hosts.prefix(host))
                    stack.push_async_callback(process.kill)
                    await process.start(timeout_s=60)
                    services[name] = process
                bucket = S3BlobStore(
                    f"s3://{BUCKET}",
                    config=local_seaweedfs.config(endpoint, app),  # type: ignore[arg-type]
                    client_options={"allow_http": True},
                )
                yield Cluster(hosts, home, services, bucket, tokens)
            finally:
                await stack.aclose()
                if postgres_data is not None:
                    local_postgres.stop(postgres_data)
    shutil.rmtree(home, ignore_errors=True)


def dying(pid: int) -> bool:
    """Process `pid` is gone, a zombie, or has a SIGKILL pending (sent by the kernel when its parent died)."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (OSError, ValueError):
        return True
    pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
    return status["State"].strip()[0] in "ZX" or bool(pending & (1 << (signal.SIGKILL - 1)))


async def exits(pid: int, timeout_s: float) -> None:
    """Until process `pid` has exited (its pidfd becomes readable: woken by the kernel, not polled)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    exited = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(pidfd, exited.set)
    try:
        async with asyncio.timeout(timeout_s):
            await exited.wait()
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def files_under(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file()] if directory.exists() else []


def ffmpeg_processes_under(home: Path) -> dict[int, str]:
    """The ffmpeg processes working on files of this cluster under `home`: pid and command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # The bundled binary is named ffmpeg-linux-...; its arguments name the job's scratch files.
        if Path(argv[0].decode(errors="replace")).name.startswith("ffmpeg") and str(home).encode() in b" ".join(argv):
            found[int(entry.name)] = b" ".join(argv).decode(errors="replace")
    return found


async def upload(cluster: Cluster, path: Path) -> str:
    async with httpx.AsyncClient(timeout=60) as client:
        with path.open("rb") as file:
            response = await client.post(
                f"{cluster.services['upload'].url}/videos",
                data={"title": path.stem, "renditions": "360p,240p"},
                files={"file": (path.name, file, "video/mp4")},
                headers=cluster.auth("user"),
            )
    assert response.status_code == 202, response.text
    video_id: str = response.json()["video_id"]
    return video_id


async def test_clips_uploaded_on_one_host_play_from_another_through_a_killed_worker(
    cluster: Cluster, tmp_path: Path
) -> None:
    store = cluster.services["store"].url
    clips = [make_clip(tmp_path / f"cat-{n}.mp4", 640, 360, 3) for n in range(CLIPS)]
    victim = cluster.services["processing-3"]
    transcoding = asyncio.create_task(victim.wait_for_log("transcoding ", timeout_s=120))

    async with aclosing(live_changes(store)) as changes:
        await anext(changes)  # listening: no change is missed from here on
        uploads = asyncio.gather(*(upload(cluster, clip) for clip in clips))
        await transcoding
        await victim.kill()  # kill -9 mid-transcode: its job comes back to the queue
        started, finished = (sum(text in line for line in victim.log) for text in ("transcoding ", "transcoded "))
        assert started > finished, "host 3's processing was killed after its transcode, not during it"
        # Its ffmpeg (if it got as far as starting one) dies with it: one still running past this is an orphan.
        left = ffmpeg_processes_under(cluster.home / "processing-3")
        assert all(dying(pid) for pid in left), left
        for pid in left:
            await exits(pid, timeout_s=10)
        print(f"cross-host: host 3's processing killed (-9) mid-transcode; {len(left)} ffmpeg of it still dying")
        ids = await uploads
        await victim.start(timeout_s=60)  # the same instance again (its queues are its own, not new ones)
        if cluster.hosts.links is not None:
            # Host 3 off the network for a while (its router, store and processing unreachable, and they reach
            # nothing), then back: the connections through it stall instead of failing, as a real cut does.
            cluster.hosts.set_link(3, "down")
            await asyncio.sleep(CUT_S)  # the outage's length, not a wait for something
            cluster.hosts.set_link(3, "up")
            print(f"cross-host: host 3 cut off the network for {CUT_S} s, then restored")
        else:
            print("cross-host: loopback hosts cannot be cut off the network; that part is not run")
        final = await until(changes, set(ids), FINAL)
    assert {video["status"] for video in final.values()} == {"ready"}, final

    async with httpx.AsyncClient(timeout=30) as client:
        for video_id in ids:
            video = (await client.get(f"{store}/videos/{video_id}")).json()
            assert video["status"] == "ready"
            assert {rendition["name"] for rendition in video["renditions"]} == {"360p", "240p"}
            prefix = f"videos/{video_id}/"
            stored = await cluster.bucket.list(prefix)
            assert [key for key in stored if "/hls/" not in key] == [
                f"{prefix}{name}" for name in ("240p.mp4", "360p.mp4", "master.mp4", "poster.jpg")
            ]
            package = {key.split("/", 4)[4] for key in stored if "/hls/" in key}  # below videos/{id}/hls/{version}/
            assert {"master.m3u8", "360p/index.m3u8", "240p/index.m3u8", "240p/seg-00000.m4s"} <= package
            hls = await client.get(video["hls_url"])
            assert hls.status_code == 200 and hls.text.startswith("#EXTM3U")
            played = await client.get(video["renditions"][0]["url"], headers={"Range": "bytes=0-99"})
            assert played.status_code == 206 and len(played.content) == 100
    assert files_under(cluster.home / "upload" / "upload" / "spool") == []
    # A job may run twice (at-least-once): host 3's receive can lease a job just as the cut starts, and its
    # answer arrive after the cut, once the lease (6 s) has expired and another worker has the job (CI saw it:
    # the duplicate began 0.5 s after the other's, and was still encoding here). No ffmpeg may be an orphan:
    # each one left ends by itself.
    for pid in ffmpeg_processes_under(cluster.home):
        await exits(pid, timeout_s=60)
    assert ffmpeg_processes_under(cluster.home) == {}

    # Delete half through host 3's store: every processing instance acks its own deletion queue.
    gone, kept = ids[: CLIPS // 2], ids[CLIPS // 2 :]
    router = cluster.services["router-3"].url
    async with RouterClient(router, token=cluster.tokens["service"]) as client:
        queues = [deletions_queue_name(name) for name in ("processing-2", "processing-3")]
        before = {queue: (await client.stats(queue)).delivered_total for queue in queues}
        async with httpx.AsyncClient(timeout=30) as http:
            for video_id in gone:
                deleted = await http.delete(f"{store}/videos/{video_id}", headers=cluster.auth("user"))
                assert deleted.status_code == 202, deleted.text
        for queue in queues:
            async with asyncio.timeout(60), aclosing(client.watch_stats(queue)) as watch:
                async for stats in watch:
                    if stats.delivered_total >= before[queue] + len(gone):
                        break
    for video_id in gone:
        assert await cluster.bucket.list(f"videos/{video_id}/") == []
    for video_id in kept:
        assert f"videos/{video_id}/master.mp4" in await cluster.bucket.list(f"videos/{video_id}/")
