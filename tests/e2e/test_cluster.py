"""`cattube up --cluster` as a person runs it: PostgreSQL, SeaweedFS, two routers, two processing
instances, upload and store as processes on loopback, driven over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import obstore
import pytest
from obstore.store import S3Store

from services.cli import local_postgres, local_seaweedfs
from services.cli.cluster import BUCKET
from services.cli.local_seaweedfs import Identity
from tests.e2e.stack import Stack
from tests.e2e.test_stack import until, upload, watching
from tests.media import make_clip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
async def cluster() -> AsyncIterator[Stack]:
    # Not under pytest's tmp_path: as root PostgreSQL runs as `postgres`, which must reach its directory
    # (pytest's base directory is closed to other users; `cattube up --cluster` says so and stops).
    home = Path(tempfile.mkdtemp(prefix="cattube-cluster-"))
    os.chmod(home, 0o755)
    running = Stack(home / "data", cluster=True, CATTUBE_SCALE_IN_COOLDOWN_S="1", CATTUBE_MAX_WORKERS="1")
    try:
        await running.start(timeout_s=120)
        yield running
    finally:
        await running.stop()
        shutil.rmtree(home, ignore_errors=True)


def bucket(stack: Stack) -> S3Store:
    kept = json.loads((stack.data_dir / "cluster" / "secrets.json").read_text())
    admin = Identity(kept["s3_admin_key"], kept["s3_admin_secret"])
    endpoint = f"http://127.0.0.1:{stack.ports['s3']}"
    return S3Store(BUCKET, config=local_seaweedfs.config(endpoint, admin), client_options={"allow_http": True})  # type: ignore[arg-type]


async def test_a_video_goes_through_two_routers_into_the_bucket_and_everything_stops(
    cluster: Stack, tmp_path: Path
) -> None:
    admin = cluster.auth("admin")
    async with httpx.AsyncClient(timeout=30) as http:
        for name in ("router-1", "router-2"):
            assert (await http.get(f"{cluster.url(name)}/readyz")).status_code == 200
        # One database behind both: a subscription made on one is there on the other.
        made = await http.put(
            f"{cluster.url('router-1')}/subscriptions/cluster-probe",
            json={"pattern": {"source": ["nobody"]}, "target": {"queue": {}}},
            headers=admin,
        )
        assert made.status_code in (200, 201), made.text
        seen = await http.get(f"{cluster.url('router-2')}/subscriptions/cluster-probe", headers=admin)
        assert seen.status_code == 200, seen.text

    clip = make_clip(tmp_path / "whiskers.mp4", 640, 360, 2)
    async with watching(cluster) as changes:
        video_id = await upload(cluster, clip, renditions="240p")
        (record,) = (await until(changes, {video_id}, {"ready", "failed"})).values()
    assert record["status"] == "ready", record
    keys = [meta["path"] async for batch in obstore.list(bucket(cluster), None) for meta in batch]
    assert any(key.startswith(f"videos/{video_id}/") for key in keys), keys
    async with httpx.AsyncClient(timeout=30) as http:
        rendition = record["renditions"][0]["url"]
        played = await http.get(rendition, headers={"Range": "bytes=0-99"})
        assert played.status_code == 206 and len(played.content) == 100

    postgres = cluster.data_dir / "cluster" / "postgres" / "data"
    assert local_postgres.is_running(postgres)
    assert cluster.proc is not None
    cluster.proc.send_signal(signal.SIGINT)
    assert await cluster.proc.wait() == 0
    await cluster.stop()
    assert "CatTube: stopping PostgreSQL" in cluster.log
    assert not local_postgres.is_running(postgres)
