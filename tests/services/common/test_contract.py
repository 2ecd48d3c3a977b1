"""The contract in code: every event the producers build reads back through its model unchanged, a malformed
one is refused naming its field, and every service uses the one ladder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from router import announcements
from router.client import new_event
from services.cli import upload as cli_upload
from services.common import contract
from services.common.blobs import BlobInfo
from services.common.db import Connection, SQLiteDatabase
from services.common.errors import InvalidInput
from services.common.outbox import OUTBOX
from services.processing import events
from services.processing.job import parse_request
from services.processing.ladder import RUNG_NAMES, plan_ladder
from services.processing.worker import PermanentFailure
from services.store.catalog import Catalog
from services.store.tables import CATALOG
from services.upload.metadata import parse_renditions
from services.upload.probe import Probe
from services.upload.uploads import Described, _uploaded

BUCKET = "file:///srv/bucket/videos/v1/"


def uploaded_event(video_id: str = "v1") -> dict[str, Any]:
    master = BlobInfo(f"videos/{video_id}/master.mp4", 1234, "ab" * 32, 0.0, f"{BUCKET}master.mp4")
    probe = Probe("mov", 2.0, 1920, 1080, 25.0, "h264", None, 90)
    data = _uploaded(video_id, Described("Whiskers", ("720p", "360p")), master, "video/mp4", probe).dump()
    return new_event(contract.UPLOADED, "cattube/upload", data, id=video_id, partitionkey=video_id)


def processing_events(video_id: str = "v1") -> list[dict[str, Any]]:
    rendition = contract.Rendition(
        name="720p",
        uri=f"{BUCKET}720p.mp4",
        width=720,
        height=1280,
        bitrate=900_000,
        size_bytes=4321,
        duration_s=2.0,
    )
    return [
        events.started(video_id, "1.1-ab", worker="worker-a-1", attempt=1, instance="host-a"),
        events.progress(video_id, "1.1-ab", 1, percent=42.42, speed=1.234),
        events.completed(
            video_id,
            "1.1-ab",
            renditions=[rendition],
            skipped=["1080p"],
            poster_uri=f"{BUCKET}poster.jpg",
            hls_uri=f"{BUCKET}hls/0123456789ab/master.m3u8",
            elapsed_s=3.14159,
            worker="worker-a-1",
            attempt=1,
        ),
    ]


async def store_events(tmp_path: Path) -> list[dict[str, Any]]:
    """What the store publishes when fed the real producers' events: ready, failed, retry-requested, updated,
    deleted."""
    db = SQLiteDatabase(tmp_path / "catalog.db", [CATALOG, OUTBOX])
    await db.open()
    try:
        catalog = Catalog(db, public_url="http://store")
        for event in [uploaded_event("v1"), *processing_events("v1"), uploaded_event("v2")]:
            await catalog.apply(event)
        await catalog.apply(events.failed("v2", "1.1-cd", attempt=1, permanent=True, reason="Unreadable."))
        await catalog.request_retry("v2")
        await catalog.edit("v2", title="Mittens", description="Asleep\nagain")
        await catalog.delete("v1")

        def owed(conn: Connection) -> list[dict[str, Any]]:
            return [json.loads(row["event"]) for row in conn.fetch("SELECT event FROM outbox ORDER BY seq")]

        return await db.transact(owed)
    finally:
        await db.close()


async def test_every_producer_s_event_reads_back_through_its_model_unchanged(tmp_path: Path) -> None:
    produced = [
        uploaded_event(),
        *processing_events(),
        events.failed("v1", "1.2-ef", attempt=2, permanent=False, reason="The bucket was away."),
        events.scaled("host-1", "5eed", 3, from_=0, to=2, backlog=5, in_flight=1, busy=0, reason="backlog 5"),
        announcements.dead_lettered(
            "transcode", 7, uploaded_event(), attempts=5, last_error="boom", context={"limit": "max_receive_count"}
        ),
        *await store_events(tmp_path),
    ]
    kinds = {event["type"] for event in produced}
    assert kinds == set(contract.MODELS), "every event type of the contract is produced here"
    for event in produced:
        data = contract.parse(event)
        assert type(data) is contract.MODELS[event["type"]]
        assert data.dump() == event["data"], event["type"]


async def test_the_store_s_retry_repeats_the_upload_s_master_and_probe(tmp_path: Path) -> None:
    retry = next(e for e in await store_events(tmp_path) if e["type"] == contract.RETRY_REQUESTED)
    upload = uploaded_event("v2")["data"]
    assert {name: retry["data"][name] for name in ("master", "probe", "renditions")} == {
        name: upload[name] for name in ("master", "probe", "renditions")
    }
    assert parse_request(retry).probe == contract.Probe.model_validate(upload["probe"])


@pytest.mark.parametrize(
    ("kind", "data", "field"),
    [
        (contract.TRANSCODE_COMPLETED, {"video_id": "v1"}, "data.renditions"),
        (contract.TRANSCODE_COMPLETED, {"video_id": "v1", "renditions": [{"name": "720p"}]}, "data.renditions[0].uri"),
        (contract.TRANSCODE_COMPLETED, {"video_id": "v1", "renditions": [{"name": "4k", "uri": "u"}]},
         "data.renditions[0].name"),
        (contract.TRANSCODE_COMPLETED, {"video_id": "v1", "renditions": [], "hls": {"url": "u"}}, "data.hls.uri"),
        (contract.TRANSCODE_PROGRESS, {"video_id": "v1", "percent": "50"}, "data.percent"),
        (contract.TRANSCODE_STARTED, {"video_id": "v1", "attempt": True}, "data.attempt"),
        (contract.TRANSCODE_FAILED, {"video_id": "../etc"}, "data.video_id"),
        (contract.PROCESSING_SCALED, {"from": -1, "to": 2}, "data.from"),
        (contract.UPLOADED, {"video_id": "v1", "master": {"size_bytes": 3}}, "data.master.uri"),
        (contract.UPLOADED, {"video_id": "v1", "probe": {"width": 1.5}}, "data.probe.width"),
        (contract.DEAD_LETTERED, {"event_id": "e1"}, "data.subscription"),
        (contract.VIDEO_DELETED, [], "data"),
        (contract.VIDEO_UPDATED, {"video_id": "v1", "title": "Mittens"}, "data.revision"),
        (contract.VIDEO_UPDATED, {"video_id": "v1", "description": 5, "revision": 1}, "data.description"),
    ],
)  # fmt: skip
def test_malformed_data_is_refused_naming_the_field(kind: str, data: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        contract.parse(new_event(kind, "cattube/test", data))
    assert refused.value.field == field
    assert refused.value.errors == [{"field": field, "expected": refused.value.expected}]


def test_an_event_type_outside_the_contract_is_refused_by_the_default_parse() -> None:
    with pytest.raises(InvalidInput) as refused:
        contract.parse(new_event("cattube.cat.purred", "cattube/test", {}))
    assert refused.value.field == "type"


async def test_the_store_refuses_a_completed_without_renditions(tmp_path: Path) -> None:
    db = SQLiteDatabase(tmp_path / "catalog.db", [CATALOG, OUTBOX])
    await db.open()
    try:
        catalog = Catalog(db, public_url="http://store")
        bad = new_event(contract.TRANSCODE_COMPLETED, "cattube/processing", {"video_id": "v1"}, partitionkey="v1")
        with pytest.raises(InvalidInput, match=r"data\.renditions: expected a value"):
            await catalog.apply(bad)
    finally:
        await db.close()


def test_a_completed_from_before_hls_still_reads() -> None:
    old = processing_events()[2]
    del old["data"]["hls"]
    data = contract.parse(old, contract.TranscodeCompleted)
    assert data.hls is None and data.renditions[0].name == "720p"


async def test_the_ready_event_carries_the_playlist_s_url_and_uri(tmp_path: Path) -> None:
    ready = next(e for e in await store_events(tmp_path) if e["type"] == contract.VIDEO_READY)
    assert ready["data"]["hls_url"] == "http://store/videos/v1/hls/0123456789ab/master.m3u8"
    assert ready["data"]["hls_uri"] == f"{BUCKET}hls/0123456789ab/master.m3u8"


def test_processing_fails_a_malformed_job_permanently_naming_the_field() -> None:
    event = uploaded_event()
    event["data"]["probe"]["fps"] = "fast"
    with pytest.raises(PermanentFailure, match=r"data\.probe\.fps"):
        parse_request(event)


def test_every_service_uses_the_one_ladder() -> None:
    assert contract.RENDITION_NAMES == tuple(contract.LADDER) == RUNG_NAMES == cli_upload.RENDITION_NAMES
    assert parse_renditions(",".join(contract.RENDITION_NAMES)) == contract.RENDITION_NAMES
    plan = plan_ladder(3840, 2160, 0, contract.RENDITION_NAMES)
    assert {rung.name: min(rung.width, rung.height) for rung in plan.rungs} == dict(contract.LADDER)
