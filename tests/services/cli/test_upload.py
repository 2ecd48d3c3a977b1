"""`cattube upload`: a failure is one or two clear lines on stderr and a non-zero exit; a success links the video."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.cli import main
from tests.media import make_clip
from tests.process import REPO, ServiceProcess, free_port, service


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
