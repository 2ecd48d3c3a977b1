"""`cattube upload`: a failure is one or two clear lines on stderr and a non-zero exit; a success links the video."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from services.cli import main
from tests.media import make_clip
from tests.process import REPO, ServiceProcess, free_port, service
from tests.services.upload.uploading import padded


@pytest.fixture
def video(tmp_path: Path) -> Path:
    path = tmp_path / "whiskers.mp4"
    path.write_bytes(b"\0" * 4096)
    return path


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A port that accepts connections but never answers, as the upload service's; tells whether anyone came."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        monkeypatch.setenv("CATTUBE_UPLOAD_PORT", str(sock.getsockname()[1]))
        yield sock


def connected(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return False
    return True


def test_upload_with_the_stack_stopped_says_what_to_run(
    video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # bound and closed again: nothing listens there
    monkeypatch.setenv("CATTUBE_UPLOAD_PORT", str(port))
    code = main(["--data-dir", str(tmp_path), "upload", str(video)])
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) <= 2, err
    assert f"127.0.0.1:{port}" in err and "not reachable" in err and "cattube up" in err
    assert ".;" not in err and ";;" not in err, err  # the resume hint joins the sentence, not a period


def test_unknown_renditions_are_refused_before_connecting(
    video: Path, tmp_path: Path, listener: socket.socket, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--data-dir", str(tmp_path), "upload", str(video), "--renditions", "720p,4000p"])
    err = capsys.readouterr().err
    assert code != 0
    assert "4000p" in err and "1080p" in err and len(err.strip().splitlines()) <= 2, err
    assert not connected(listener)


@pytest.mark.parametrize("make", ["missing", "directory", "unreadable"])
def test_a_file_that_cannot_be_read_is_refused_before_connecting(
    make: str, tmp_path: Path, listener: socket.socket, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "clip.mp4"
    if make == "directory":
        path.mkdir()
    elif make == "unreadable":
        path.write_bytes(b"x")
        path.chmod(0)
        if os.access(path, os.R_OK):  # root reads anything: nothing to check then
            pytest.skip("running as root")
    code = main(["--data-dir", str(tmp_path), "upload", str(path)])
    err = capsys.readouterr().err
    assert code != 0
    assert str(path) in err and len(err.strip().splitlines()) <= 2, err
    assert not connected(listener)


@pytest.fixture
async def upload_and_store(tmp_path: Path) -> AsyncIterator[tuple[ServiceProcess, ServiceProcess]]:
    """Real upload and store processes (no router: neither needs one to answer)."""
    env = {"CATTUBE_DATA_DIR": str(tmp_path / "data"), "CATTUBE_ROUTER_URL": "http://127.0.0.1:9"}
    async with service("services.upload", env) as upload, service("services.store", env) as store:
        yield upload, store


@pytest.mark.slow
async def test_a_refused_upload_with_wait_prints_only_the_refusal(
    upload_and_store: tuple[ServiceProcess, ServiceProcess], tmp_path: Path
) -> None:
    upload, store = upload_and_store
    text = tmp_path / "notvideo.mp4"
    text.write_text("hello, not a video\n")
    env = {"CATTUBE_UPLOAD_PORT": str(upload.port), "CATTUBE_STORE_PORT": str(store.port)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "--data-dir", str(tmp_path / "cli"), "upload", str(text), "--wait",
        cwd=REPO, env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = err.decode().strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and "not a video" in lines[0], lines


class CuttingProxy:
    """A TCP proxy to a port that drops every connection once `cut_after` bytes have gone through it towards
    the server (a connection lost mid-upload); with `cut_after=None` it passes everything."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut_after: int | None = None
        self.forwarded = 0

    async def connected(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def upstream() -> None:
            while data := await client_reader.read(64 * 1024):
                if self.cut_after is not None:
                    data = data[: max(0, self.cut_after - self.forwarded)]
                self.forwarded += len(data)
                server_writer.write(data)
                await server_writer.drain()
                if self.cut_after is not None and self.forwarded >= self.cut_after:
                    return

        async def downstream() -> None:
            while data := await server_reader.read(64 * 1024):
                client_writer.write(data)
                await client_writer.drain()

        try:
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())],
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*done, *pending, return_exceptions=True)
        finally:
            for writer in (client_writer, server_writer):
                writer.close()


async def cattube(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args,
        cwd=REPO, env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_an_upload_cut_short_resumes_when_run_again(tmp_path: Path) -> None:
    video = tmp_path / "whiskers.mp4"
    video.write_bytes(padded(make_clip(tmp_path / "clip.mp4", 320, 240, 1.0).read_bytes(), 24 << 20))
    env = {"CATTUBE_DATA_DIR": str(tmp_path / "data"), "CATTUBE_ROUTER_URL": "http://127.0.0.1:9"}
    async with service("services.upload", env) as upload:
        proxy = CuttingProxy(upload.port)
        server = await asyncio.start_server(proxy.connected, "127.0.0.1", 0)
        async with server:
            cli_env = {"CATTUBE_UPLOAD_PORT": str(server.sockets[0].getsockname()[1])}
            cli = ("--data-dir", str(tmp_path / "cli"), "upload", str(video), "--title", "Whiskers")
            proxy.cut_after = 12 << 20  # the connection drops halfway through the file
            code, _, err = await cattube(*cli, env=cli_env)
            assert code != 0 and "run the same command again to resume" in err, err
            remembered = json.loads((tmp_path / "cli" / "cli" / "uploads.json").read_text())
            (url,) = remembered.values()

            proxy.cut_after = None
            code, out, err = await cattube(*cli, env=cli_env)
            assert code == 0, err
        resumed = re.search(r"resuming at (\d+) of (\d+) bytes", out)
        assert resumed is not None, out
        assert 0 < int(resumed[1]) <= 12 << 20 and int(resumed[2]) == 24 << 20
        video_id = url.rsplit("/", 1)[1]
        assert f"{video_id}: uploaded" in out  # the same upload, finished
        assert json.loads((tmp_path / "cli" / "cli" / "uploads.json").read_text()) == {}
        async with httpx.AsyncClient(base_url=upload.url) as http:
            master = (await http.get(f"/videos/{video_id}")).json()["master"]
        assert master["sha256"] == hashlib.sha256(video.read_bytes()).hexdigest()


@pytest.mark.slow
async def test_an_upload_prints_its_watch_page(
    upload_and_store: tuple[ServiceProcess, ServiceProcess], tmp_path: Path
) -> None:
    upload, store = upload_and_store
    clip = make_clip(tmp_path / "whiskers.mp4", 320, 180, 1)
    env = {"CATTUBE_UPLOAD_PORT": str(upload.port), "CATTUBE_STORE_PORT": str(store.port)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "--data-dir", str(tmp_path / "cli"), "upload", str(clip),
        cwd=REPO, env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    video_id, _, said = out.decode().strip().splitlines()[-1].partition(": ")  # after the progress bar
    assert said == f"uploaded; watch it at http://127.0.0.1:{store.port}/watch/{video_id}"
