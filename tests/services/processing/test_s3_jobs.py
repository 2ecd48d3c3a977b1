"""Transcoding jobs on an S3 bucket (SeaweedFS): the master downloaded to the job's scratch, the outputs uploaded,
the scratch removed whatever happens; an S3 that is unreachable, refuses the keys or dies mid-job hands the job back."""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from router.client import ReceivedMessage, new_event
from services.common.blobs import BlobStore, video_key
from services.common.s3_blobs import S3BlobStore
from services.processing.job import TranscodeJobs
from services.processing.settings import ProcessingSettings
from services.processing.worker import JobContext, RetryLater
from tests.media import make_clip
from tests.process import free_port
from tests.s3 import CLIENT, S3Server, new_bucket, throwaway_seaweedfs

PROBE = {"duration_s": 1.0, "width": 320, "height": 240, "fps": 25.0, "video_codec": "h264", "rotation": 0}


class Sink:
    """The job's event sink, keeping what it is given; `on_announce` runs on each announced event."""

    def __init__(self, on_announce: Callable[[Mapping[str, Any]], None] = lambda event: None) -> None:
        self.events: list[Mapping[str, Any]] = []
        self.on_announce = on_announce

    def announce(self, event: Mapping[str, Any]) -> None:
        self.events.append(event)
        self.on_announce(event)

    async def publish(self, event: Mapping[str, Any]) -> None:
        self.events.append(event)


def job_for(video_id: str, master_uri: str) -> ReceivedMessage:
    data = {
        "video_id": video_id,
        "renditions": ["144p"],
        "probe": PROBE,
        "master": {"uri": master_uri, "size_bytes": 1, "sha256": "0" * 64, "content_type": "video/mp4"},
    }
    event = new_event("cattube.video.uploaded", "cattube/upload", data, id=video_id, partitionkey=video_id)
    return ReceivedMessage(secrets.token_hex(8), 1, 1, event)


def scratch(settings: ProcessingSettings) -> list[Path]:
    return list(settings.work_dir.iterdir()) if settings.work_dir.exists() else []


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "cat.mp4", 320, 240, 1.0)


async def test_a_job_downloads_the_master_uploads_its_outputs_and_leaves_no_scratch(
    tmp_path: Path, s3: S3Server, s3_url: str, master: Path
) -> None:
    settings = ProcessingSettings(data_dir=tmp_path / "data", blob_url=s3_url)
    store = S3BlobStore(s3_url, config=s3.config(), client_options=CLIENT)  # type: ignore[arg-type]
    uploaded = await store.put_file(video_key("v1", "master.mp4"), master)
    scratch_seen: list[list[Path]] = []
    sink = Sink(lambda event: scratch_seen.append(scratch(settings)))
    await TranscodeJobs(store, sink, settings).run(job_for("v1", uploaded.uri), JobContext("w1", 1))
    assert any(scratch_seen), "the job works in a scratch directory of its own"
    assert scratch(settings) == []
    completed = sink.events[-1]
    assert completed["type"] == "cattube.transcode.completed"
    package = store.key_of(completed["data"]["hls"]["uri"]).removesuffix("master.m3u8")  # videos/v1/hls/{version}/
    assert await store.list("videos/v1/") == sorted(
        ["videos/v1/144p.mp4", "videos/v1/master.mp4", "videos/v1/poster.jpg"]
        + [f"{package}{name}" for name in ("master.m3u8", "144p/index.m3u8", "144p/init.mp4", "144p/seg-00000.m4s")]
    )
    (rendition,) = completed["data"]["renditions"]
    info = await store.stat("videos/v1/144p.mp4")
    assert info is not None and rendition["uri"] == info.uri and rendition["size_bytes"] == info.size_bytes
    assert completed["data"]["poster"]["uri"] == store.uri("videos/v1/poster.jpg")


@pytest.mark.parametrize("fault", ["unreachable", "credentials"])
async def test_a_bucket_that_cannot_be_used_hands_the_job_back_saying_why(
    tmp_path: Path, s3: S3Server, s3_url: str, master: Path, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ProcessingSettings(data_dir=tmp_path / "data", blob_url=s3_url)
    uploaded = await S3BlobStore(s3_url).put_file(video_key("v1", "master.mp4"), master)
    if fault == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + secrets.token_hex(8))
    store: BlobStore = S3BlobStore(s3_url)
    with pytest.raises(RetryLater) as raised:
        await TranscodeJobs(store, Sink(), settings).run(job_for("v1", uploaded.uri), JobContext("w1", 1))
    expected = "could not" if fault == "unreachable" else "AWS_SECRET_ACCESS_KEY"
    assert "bucket" in raised.value.reason and expected in raised.value.reason, raised.value.reason
    assert scratch(settings) == []


async def test_s3_killed_while_a_job_transcodes_hands_it_back_and_leaves_no_scratch(
    tmp_path: Path, master: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with throwaway_seaweedfs() as server:
        pid = server.pid
        assert pid is not None
        for variable, value in server.environment().items():
            monkeypatch.setenv(variable, value)
        blob_url = f"s3://{await new_bucket(server)}/media"  # not emptied afterwards: the server is killed
        settings = ProcessingSettings(data_dir=tmp_path / "data", blob_url=blob_url)
        store = S3BlobStore(blob_url)
        uploaded = await store.put_file(video_key("v1", "master.mp4"), master)

        killed: list[int] = []

        def kill_once_transcoding(event: Mapping[str, Any]) -> None:
            if event["type"] == "cattube.transcode.progress" and not killed:
                os.kill(pid, signal.SIGKILL)  # the master is down already; the outputs cannot go up
                killed.append(pid)

        with pytest.raises(RetryLater) as raised:
            await TranscodeJobs(store, Sink(kill_once_transcoding), settings).run(
                job_for("v1", uploaded.uri), JobContext("w1", 1)
            )
        assert killed
        assert "stored in the bucket" in raised.value.reason and server.endpoint in raised.value.reason
        assert scratch(settings) == []
