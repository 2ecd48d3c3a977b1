"""The catalog's state machine: forward-only status, idempotence, out-of-order events, retry rounds, tombstones.

Every test runs on SQLite and on PostgreSQL (`database_for`): the catalog is one set of rules over either engine.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.common import outbox
from services.common.blobs import FileBlobStore
from services.common.db import Connection, Database, SQLiteDatabase
from services.common.errors import Conflict, InvalidInput, NotFound
from services.store.catalog import Catalog, Outcome
from services.store.tables import CATALOG, POSTGRES_SCHEMA, SQLITE_TABLES
from tests.services.conftest import DatabaseFactory
from tests.services.store.conftest import completed, event, uploaded


@pytest.fixture
def bucket(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "bucket")


def catalog_db(database_for: DatabaseFactory) -> Database:
    return database_for(POSTGRES_SCHEMA, [CATALOG, outbox.OUTBOX], name="catalog")


@pytest.fixture
async def catalog(database_for: DatabaseFactory) -> AsyncIterator[Catalog]:
    db = catalog_db(database_for)
    await db.open()
    changes: list[Outcome] = []
    catalog = Catalog(db, public_url="http://store", history_size=3, on_change=changes.append)
    try:
        yield catalog
    finally:
        await db.close()


async def owed(catalog: Catalog) -> list[dict[str, Any]]:
    """The events in the outbox, oldest first."""

    def events(conn: Connection) -> list[dict[str, Any]]:
        return [json.loads(row["event"]) for row in conn.fetch("SELECT event FROM outbox ORDER BY seq")]

    return await catalog.db.transact(events)


def started(video_id: str, attempt: int = 1) -> dict[str, Any]:
    return event("cattube.transcode.started", {"video_id": video_id, "worker": "worker-1", "attempt": attempt})


def progress(video_id: str, percent: float) -> dict[str, Any]:
    return event("cattube.transcode.progress", {"video_id": video_id, "percent": percent, "speed": 2.5})


def failed(video_id: str, permanent: bool, reason: str = "The master is unreadable.") -> dict[str, Any]:
    return event(
        "cattube.transcode.failed", {"video_id": video_id, "attempt": 1, "permanent": permanent, "reason": reason}
    )


def dead_lettered(
    video_id: str, *, subscription: str = "transcode", job: str = "cattube.video.uploaded", job_id: str | None = None
) -> dict[str, Any]:
    data = {
        "subscription": subscription,
        "event_id": job_id or video_id,
        "event_source": "cattube/upload",
        "event_type": job,
        "attempts": 3,
        "last_error": "received more than 3 times",
    }
    return event("cattube.router.dead-lettered", data, source="cattube/router", partitionkey=video_id)


async def test_a_video_goes_from_uploaded_to_ready_and_the_store_announces_it(
    catalog: Catalog, bucket: FileBlobStore
) -> None:
    await catalog.apply(uploaded("v1", bucket))
    assert (await catalog.get("v1")).status == "uploaded"
    await catalog.apply(started("v1"))
    await catalog.apply(progress("v1", 40))
    video = await catalog.get("v1")
    assert (video.status, video.progress, video.speed, video.worker) == ("processing", 40.0, 2.5, "worker-1")

    await catalog.apply(completed("v1", bucket))
    video = await catalog.get("v1")
    assert (video.status, video.progress, video.title) == ("ready", 100.0, "Whiskers on the beach")
    record = video.record("http://store")
    assert [r["name"] for r in record["renditions"]] == ["720p", "360p"]
    assert record["renditions"][0]["url"] == "http://store/videos/v1/renditions/720p"
    assert record["poster_url"] == "http://store/videos/v1/poster"
    (ready,) = await owed(catalog)
    assert ready["type"] == "cattube.video.ready" and ready["partitionkey"] == "v1"
    assert ready["data"]["status"] == "ready" and ready["data"]["renditions"][0]["uri"].startswith("file://")


async def test_a_repeated_event_changes_nothing(catalog: Catalog, bucket: FileBlobStore) -> None:
    first = await catalog.apply(uploaded("v1", bucket))
    again = await catalog.apply(uploaded("v1", bucket))
    assert not first.duplicate and again.duplicate and not again.videos
    await catalog.apply(completed("v1", bucket))
    done = completed("v1", bucket)
    await catalog.apply(done)
    assert (await catalog.apply(done)).duplicate
    assert len(await owed(catalog)) == 1  # one ready announcement for all of it


async def test_events_out_of_order_never_move_the_status_back(catalog: Catalog, bucket: FileBlobStore) -> None:
    await catalog.apply(completed("v1", bucket))  # before the upload event, even
    assert (await catalog.get("v1")).status == "ready"
    await catalog.apply(uploaded("v1", bucket))
    await catalog.apply(started("v1"))
    await catalog.apply(progress("v1", 10))
    await catalog.apply(failed("v1", permanent=True))
    video = await catalog.get("v1")
    assert (video.status, video.progress, video.title, video.error) == ("ready", 100.0, "Whiskers on the beach", None)
    assert [e["type"] for e in await owed(catalog)] == ["cattube.video.ready"]


async def test_progress_only_grows_within_an_attempt_and_restarts_with_the_next(
    catalog: Catalog, bucket: FileBlobStore
) -> None:
    await catalog.apply(progress("v1", 50))  # before `started`: the video is processing already
    assert (await catalog.get("v1")).status == "processing"
    await catalog.apply(progress("v1", 30))
    assert (await catalog.get("v1")).progress == 50
    await catalog.apply(failed("v1", permanent=False, reason="The bucket did not answer."))
    video = await catalog.get("v1")
    assert (video.status, video.last_error, video.error) == ("processing", "The bucket did not answer.", None)
    await catalog.apply(started("v1", attempt=2))
    assert (await catalog.get("v1")).progress == 0


async def test_a_permanent_failure_fails_the_video_and_ready_still_wins_later(
    catalog: Catalog, bucket: FileBlobStore
) -> None:
    await catalog.apply(uploaded("v1", bucket))
    await catalog.apply(failed("v1", permanent=True, reason="No video frame could be decoded."))
    video = await catalog.get("v1")
    assert (video.status, video.error) == ("failed", "No video frame could be decoded.")
    await catalog.apply(started("v1"))  # late: ignored
    assert (await catalog.get("v1")).status == "failed"
    # An operator redrove the job and it worked: renditions in the bucket outrank the old failure.
    await catalog.apply(completed("v1", bucket))
    assert (await catalog.get("v1")).status == "ready"
    assert [e["type"] for e in await owed(catalog)] == ["cattube.video.failed", "cattube.video.ready"]


async def test_a_dead_letter_of_the_transcode_queue_fails_the_video(catalog: Catalog, bucket: FileBlobStore) -> None:
    await catalog.apply(uploaded("v1", bucket))
    await catalog.apply(failed("v1", permanent=False, reason="The master was briefly unreadable."))
    assert (await catalog.get("v1")).status == "processing"
    await catalog.apply(dead_lettered("v1", subscription="store"))  # the store's own: not a verdict on the video
    await catalog.apply(dead_lettered("v1", subscription="analytics"))
    assert (await catalog.get("v1")).status == "processing"
    await catalog.apply(dead_lettered("v1"))
    video = await catalog.get("v1")
    assert video.status == "failed"
    assert video.error == "Transcoding gave up after 3 attempt(s): The master was briefly unreadable."
    (announcement,) = await owed(catalog)
    assert announcement["type"] == "cattube.video.failed" and announcement["data"]["error"] == video.error


async def test_retry_starts_a_new_round_with_the_original_master_and_probe(
    catalog: Catalog, bucket: FileBlobStore
) -> None:
    await catalog.apply(uploaded("v1", bucket))
    with pytest.raises(Conflict):
        await catalog.request_retry("v1")  # not failed
    await catalog.apply(dead_lettered("v1"))
    video = await catalog.request_retry("v1")
    assert (video.status, video.round, video.error, video.progress) == ("processing", 1, None, 0.0)
    with pytest.raises(Conflict):
        await catalog.request_retry("v1")  # processing again
    retry = (await owed(catalog))[-1]
    assert retry["type"] == "cattube.video.retry-requested" and retry["id"] == "v1/retry/1"
    assert retry["data"]["master"]["uri"].endswith("/videos/v1/master.mp4")
    assert retry["data"]["probe"]["width"] == 1280 and retry["data"]["renditions"] == ["720p", "360p"]

    await catalog.apply(dead_lettered("v1"))  # the upload's job again, redelivered late: an earlier round
    assert (await catalog.get("v1")).status == "processing"
    await catalog.apply(dead_lettered("v1", job="cattube.video.retry-requested", job_id="v1/retry/1"))
    assert (await catalog.get("v1")).status == "failed"
    assert (await owed(catalog))[-1]["id"] == "v1/failed/1"
    await catalog.request_retry("v1")
    await catalog.apply(completed("v1", bucket))
    assert (await catalog.get("v1")).status == "ready"
    assert (await owed(catalog))[-1]["id"] == "v1/ready/2"


async def test_a_video_whose_master_was_rejected_cannot_be_retried(catalog: Catalog, bucket: FileBlobStore) -> None:
    await catalog.apply(uploaded("v1", bucket))
    reason = "The video is 320x180, smaller than every rendition asked for (720p); ask for a smaller one."
    rejected = failed("v1", permanent=True, reason=reason)
    rejected["data"]["input_rejected"] = True
    await catalog.apply(rejected)
    video = await catalog.get("v1")  # read back from the database: the verdict is kept
    assert video.status == "failed" and video.input_rejected and not video.retryable
    with pytest.raises(Conflict, match="smaller than every rendition.*upload it again"):
        await catalog.request_retry("v1")
    assert (await owed(catalog))[-1]["type"] == "cattube.video.failed"  # no retry owed


async def test_a_video_whose_upload_never_arrived_cannot_be_retried(catalog: Catalog) -> None:
    await catalog.apply(failed("v1", permanent=True))
    with pytest.raises(Conflict, match="upload it again"):
        await catalog.request_retry("v1")
    with pytest.raises(NotFound):
        await catalog.request_retry("nobody")


async def test_delete_leaves_a_tombstone_and_later_events_are_ignored(catalog: Catalog, bucket: FileBlobStore) -> None:
    await catalog.apply(uploaded("v1", bucket))
    await catalog.apply(completed("v1", bucket))
    video = await catalog.delete("v1")
    assert video.status == "deleted"
    deletion = (await owed(catalog))[-1]
    assert deletion["type"] == "cattube.video.deleted" and deletion["data"]["prefix"] == "videos/v1/"
    assert sorted(uri.rsplit("/", 1)[1] for uri in deletion["data"]["blob_uris"]) == [
        "360p.mp4", "720p.mp4", "master.mp4", "poster.jpg",
    ]  # fmt: skip
    with pytest.raises(NotFound, match="deleted"):
        await catalog.get("v1")
    await catalog.apply(completed("v1", bucket))
    await catalog.apply(progress("v1", 99))
    assert (await catalog.delete("v1")).status == "deleted"  # idempotent, nothing owed again
    assert [e["type"] for e in await owed(catalog)].count("cattube.video.deleted") == 1
    assert [v.video_id for v in (await catalog.page(limit=10)).items] == []
    assert [v.video_id for v in (await catalog.page(limit=10, status="deleted")).items] == ["v1"]
    with pytest.raises(NotFound):
        await catalog.delete("nobody")


async def test_pages_newest_first_with_a_status_filter(catalog: Catalog, bucket: FileBlobStore) -> None:
    for n in range(5):
        await catalog.apply(uploaded(f"v{n}", bucket))
    await catalog.apply(completed("v1", bucket))
    await catalog.apply(completed("v3", bucket))
    first = await catalog.page(limit=2)
    assert [v.video_id for v in first.items] == ["v4", "v3"] and first.next_cursor
    second = await catalog.page(limit=2, cursor=first.next_cursor)
    third = await catalog.page(limit=2, cursor=second.next_cursor)
    assert [v.video_id for v in second.items + third.items] == ["v2", "v1", "v0"] and third.next_cursor is None
    ready = await catalog.page(limit=10, status="ready")
    assert [v.video_id for v in ready.items] == ["v3", "v1"]
    with pytest.raises(InvalidInput, match="cursor"):
        await catalog.page(limit=2, cursor="not-a-cursor")


async def test_scaling_history_is_bounded_and_in_time_order(catalog: Catalog) -> None:
    steps = [(0, 2, 2), (2, 1, 1), (1, 0, 0), (0, 3, 5)]
    for n, (before, after, backlog) in enumerate(steps):
        data = {"from": before, "to": after, "backlog": backlog, "in_flight": 0, "reason": "queue"}
        at = f"2026-11-28T10:00:0{n}Z"
        outcome = await catalog.apply(event("cattube.processing.scaled", data, id=f"scaled/p/{n}", time=at))
        assert outcome.scaled is not None and outcome.scaled.to == after
    history = (await catalog.scaling_history(10)).points
    assert [(p.from_, p.to) for p in history] == [(2, 1), (1, 0), (0, 3)]  # history_size=3
    assert history[0].record()["at"] == "2026-11-28T10:00:01.000Z"


async def test_an_unusable_event_is_refused_and_not_remembered(catalog: Catalog, bucket: FileBlobStore) -> None:
    bad = event("cattube.transcode.progress", {"video_id": "../etc", "percent": 5})
    with pytest.raises(InvalidInput, match="video_id"):
        await catalog.apply(bad)
    with pytest.raises(InvalidInput, match="data.renditions"):
        await catalog.apply(event("cattube.transcode.completed", {"video_id": "v1", "renditions": [{"name": "big"}]}))
    with pytest.raises(InvalidInput, match="id"):
        await catalog.apply({"type": "cattube.video.uploaded", "source": "x", "data": {}})
    fixed = {**bad, "data": {"video_id": "v1", "percent": 5}}  # same source+id, now usable: applied
    assert not (await catalog.apply(fixed)).duplicate
    assert (await catalog.apply({**bad, "id": "other", "type": "cattube.something.else"})).ignored


async def test_the_catalog_survives_a_restart(database_for: DatabaseFactory, bucket: FileBlobStore) -> None:
    for round in range(2):
        db = catalog_db(database_for)
        await db.open()
        try:
            catalog = Catalog(db, public_url="http://store")
            outcome = await catalog.apply(uploaded("v1", bucket))
            assert outcome.duplicate == (round == 1)
            assert (await catalog.get("v1")).title == "Whiskers on the beach"
            assert await db.transact(outbox.counts) == (0, 0)
        finally:
            await db.close()


def updated(video_id: str, revision: int, title: str = "Mittens", description: str | None = None) -> dict[str, Any]:
    data = {"video_id": video_id, "title": title, "description": description, "revision": revision}
    return event("cattube.video.updated", data, id=f"{video_id}/updated/{revision}", source="cattube/store")


async def test_an_edit_changes_title_and_description_and_owes_an_update(
    catalog: Catalog, bucket: FileBlobStore
) -> None:
    await catalog.apply(uploaded("v1", bucket))
    await catalog.apply(completed("v1", bucket))
    video = await catalog.edit("v1", title="  Mittens\tasleep ", description="Line one\r\n\r\n\r\nLine two\x07")
    assert (video.title, video.description, video.edits) == ("Mittens asleep", "Line one\n\nLine two", 1)
    assert (await catalog.get("v1")).record("http://store")["description"] == "Line one\n\nLine two"
    update = (await owed(catalog))[-1]
    assert (update["type"], update["id"], update["source"], update["partitionkey"]) == (
        "cattube.video.updated", "v1/updated/1", "cattube/store", "v1",
    )  # fmt: skip
    assert update["data"] == {
        "video_id": "v1", "title": "Mittens asleep", "description": "Line one\n\nLine two", "revision": 1,
    }  # fmt: skip

    same = await catalog.edit("v1", title="Mittens asleep")  # nothing to change: no new version, nothing owed
    assert same.version == video.version and len(await owed(catalog)) == 2
    cleared = await catalog.edit("v1", description="")
    assert (cleared.title, cleared.description, cleared.edits) == ("Mittens asleep", None, 2)
    assert (await owed(catalog))[-1]["data"] == {
        "video_id": "v1",
        "title": "Mittens asleep",
        "description": None,
        "revision": 2,
    }
    # A retry of this video later carries the title a person chose, not the upload's.
    assert (await catalog.get("v1")).record("http://store", with_uris=True)["title"] == "Mittens asleep"


async def test_an_edit_is_refused_naming_the_field_and_changes_nothing(catalog: Catalog, bucket: FileBlobStore) -> None:
    await catalog.apply(uploaded("v1", bucket))
    for title in ("", " \t\n", "\x07\u202e"):
        with pytest.raises(InvalidInput) as refused:
            await catalog.edit("v1", title=title, description="kept?")
        assert refused.value.field == "body.title"
    with pytest.raises(InvalidInput) as refused:
        await catalog.edit("v1", title="ok", description="x" * 5001)
    assert refused.value.field == "body.description"
    video = await catalog.get("v1")
    assert (video.title, video.description, video.edits) == ("Whiskers on the beach", None, 0)
    assert await owed(catalog) == []
    with pytest.raises(NotFound):
        await catalog.edit("nobody", title="Mittens")
    await catalog.delete("v1")
    with pytest.raises(NotFound, match="deleted"):
        await catalog.edit("v1", title="Mittens")


async def test_update_events_apply_once_by_revision_whatever_their_order(
    catalog: Catalog, bucket: FileBlobStore
) -> None:
    # An update can arrive before the upload it edits (a replay, another partition's delay): the row keeps it.
    assert (await catalog.apply(updated("v1", 2, "Two", "the second edit"))).videos
    await catalog.apply(uploaded("v1", bucket))  # the upload's title is older than any edit
    video = await catalog.get("v1")
    assert (video.title, video.description, video.edits, video.master is not None) == (
        "Two", "the second edit", 2, True,
    )  # fmt: skip
    late = await catalog.apply(updated("v1", 1, "One"))  # an older revision: ignored
    assert late.ignored and not late.videos
    assert (await catalog.apply(updated("v1", 2, "Two", "the second edit"))).duplicate
    assert (await catalog.apply(updated("v1", 3, "Three"))).videos
    video = await catalog.get("v1")
    assert (video.title, video.description, video.edits) == ("Three", None, 3)

    # The store's own edit comes back through its subscription: recognized by revision, nothing changes.
    mine = await catalog.edit("v1", title="Four")
    echo = await catalog.apply((await owed(catalog))[-1])
    assert echo.ignored and (await catalog.get("v1")).version == mine.version

    await catalog.delete("v1")
    assert (await catalog.apply(updated("v1", 9, "Ghost"))).ignored


async def test_a_malformed_update_is_refused_naming_the_field(catalog: Catalog) -> None:
    bad = event("cattube.video.updated", {"video_id": "v1", "title": "x", "revision": 0}, source="cattube/store")
    with pytest.raises(InvalidInput, match=r"data\.revision"):
        await catalog.apply(bad)


async def test_a_catalog_from_before_descriptions_opens_and_keeps_its_videos(
    tmp_path: Path, bucket: FileBlobStore
) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(SQLITE_TABLES)  # then the videos table as it was before descriptions and edits
    conn.executescript("ALTER TABLE videos DROP COLUMN description; ALTER TABLE videos DROP COLUMN edits;")
    conn.execute(
        "INSERT INTO videos (video_id, status, title, created_at, updated_at, version) VALUES (?, ?, ?, ?, ?, ?)",
        ("old", "ready", "From before", 1.0, 1.0, 1),
    )
    conn.commit()
    conn.close()
    db = SQLiteDatabase(path, [CATALOG, outbox.OUTBOX])
    await db.open()
    try:
        catalog = Catalog(db, public_url="http://store")
        video = await catalog.get("old")
        assert (video.title, video.description, video.edits) == ("From before", None, 0)
        assert (await catalog.edit("old", description="Now with words")).description == "Now with words"
        await catalog.apply(uploaded("new", bucket))
        assert (await catalog.get("new")).title == "Whiskers on the beach"
    finally:
        await db.close()
