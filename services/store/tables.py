"""The catalog's SQLite tables and their rows: plain functions of a connection, run on the database thread.

videos      one row per video (a tombstone once deleted); JSON columns for master, probe, name lists
renditions  the renditions of each video, in the order processing listed them
applied     source+id of every event applied (recent ones: repeats are recognized, not re-applied)
scaling     the autoscaler's changes, bounded, for the chart
outbox      events owed to the router (see `services.common.outbox`)
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from typing import Any

from services.common import outbox
from services.common.errors import InvalidInput
from services.store.records import Rendition, ScalingPoint, Video

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS videos (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    video_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    title TEXT,
    master TEXT,
    probe TEXT,
    requested TEXT NOT NULL DEFAULT '[]',
    skipped TEXT NOT NULL DEFAULT '[]',
    poster_uri TEXT,
    hls_uri TEXT,
    error TEXT,
    last_error TEXT,
    progress REAL,
    speed REAL,
    attempt INTEGER,
    worker TEXT,
    elapsed_s REAL,
    round INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS videos_by_status ON videos (status, row);
CREATE INDEX IF NOT EXISTS videos_by_version ON videos (version);
CREATE TABLE IF NOT EXISTS renditions (
    video_id TEXT NOT NULL,
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    uri TEXT NOT NULL,
    width INTEGER,
    height INTEGER,
    bitrate INTEGER,
    size_bytes INTEGER,
    duration_s REAL,
    PRIMARY KEY (video_id, name)
);
CREATE TABLE IF NOT EXISTS applied (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (source, id)
);
CREATE INDEX IF NOT EXISTS applied_by_time ON applied (at);
CREATE TABLE IF NOT EXISTS scaling (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    from_workers INTEGER NOT NULL,
    to_workers INTEGER NOT NULL,
    backlog INTEGER NOT NULL,
    in_flight INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS scaling_by_time ON scaling (at);
"""
    + outbox.OUTBOX_SCHEMA
)

_VIDEO_COLUMNS = (
    "video_id", "status", "title", "master", "probe", "requested", "skipped", "poster_uri", "hls_uri", "error",
    "last_error", "progress", "speed", "attempt", "worker", "elapsed_s", "round", "created_at", "updated_at",
    "version",
)  # fmt: skip
ADDED_COLUMNS = {"videos": [("hls_uri", "TEXT")]}
"""Columns added after the first release: a catalog made before them gets them at start-up (`migrate`)."""
_JSON_COLUMNS = frozenset({"master", "probe", "requested", "skipped"})


@dataclass(frozen=True)
class Page:
    items: list[Video]
    next_cursor: str | None


def migrate(conn: sqlite3.Connection) -> None:
    """Add the columns an older release's catalog lacks (CREATE TABLE IF NOT EXISTS leaves a table as it was)."""
    for table, columns in ADDED_COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, declaration in columns:
            if name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")


# -- events applied -------------------------------------------------------------------------------


def first_time(conn: sqlite3.Connection, source: str, event_id: str, now: float) -> bool:
    """Record the event as applied; False when it already was (a repeat)."""
    cursor = conn.execute("INSERT OR IGNORE INTO applied (source, id, at) VALUES (?, ?, ?)", (source, event_id, now))
    return cursor.rowcount == 1


def forget_applied(conn: sqlite3.Connection, before: float) -> None:
    conn.execute("DELETE FROM applied WHERE at < ?", (before,))


# -- videos ---------------------------------------------------------------------------------------


def load_video(conn: sqlite3.Connection, video_id: str) -> Video | None:
    row = conn.execute("SELECT * FROM videos WHERE video_id = ?", (video_id,)).fetchone()
    if row is None:
        return None
    return _video(row, _renditions_of(conn, [video_id]).get(video_id, []))


def write_video(conn: sqlite3.Connection, video: Video, now: float) -> None:
    """Write the video with a new version, higher than any other video's."""
    (latest,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM videos").fetchone()
    video.version = latest + 1
    video.updated_at = now
    values = [
        json.dumps(getattr(video, name)) if name in _JSON_COLUMNS else getattr(video, name) for name in _VIDEO_COLUMNS
    ]
    updates = ", ".join(f"{name} = excluded.{name}" for name in _VIDEO_COLUMNS[1:])
    conn.execute(
        f"INSERT INTO videos ({', '.join(_VIDEO_COLUMNS)}) VALUES ({', '.join('?' * len(_VIDEO_COLUMNS))}) "
        f"ON CONFLICT (video_id) DO UPDATE SET {updates}",
        values,
    )
    conn.execute("DELETE FROM renditions WHERE video_id = ?", (video.video_id,))
    conn.executemany(
        "INSERT INTO renditions (video_id, name, position, uri, width, height, bitrate, size_bytes, duration_s)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (video.video_id, r.name, i, r.uri, r.width, r.height, r.bitrate, r.size_bytes, r.duration_s)
            for i, r in enumerate(video.renditions)
        ],
    )


CURSOR_PATTERN = r"^r[0-9]{1,18}$"
"""A page cursor: the catalog row to continue below (not secret; `next_cursor` hands it out)."""
CURSOR = re.compile(CURSOR_PATTERN)


def list_videos(conn: sqlite3.Connection, limit: int, cursor: str | None, status: str | None) -> Page:
    """Newest first (in the order the catalog first heard of them); deleted ones only when `status` asks."""
    clauses: list[str] = ["status = ?"] if status else ["status != 'deleted'"]
    params: list[Any] = [status] if status else []
    if cursor is not None:
        clauses.append("row < ?")
        params.append(_decode_cursor(cursor))
    rows = conn.execute(
        f"SELECT * FROM videos WHERE {' AND '.join(clauses)} ORDER BY row DESC LIMIT ?", (*params, limit + 1)
    ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    renditions = _renditions_of(conn, [row["video_id"] for row in rows])
    items = [_video(row, renditions.get(row["video_id"], [])) for row in rows]
    return Page(items, _encode_cursor(rows[-1]["row"]) if more else None)


def status_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {row[0]: row[1] for row in conn.execute("SELECT status, COUNT(*) FROM videos GROUP BY status")}


def _video(row: sqlite3.Row, renditions: list[Rendition]) -> Video:
    values = {
        name: json.loads(row[name]) if name in _JSON_COLUMNS and row[name] else row[name] for name in _VIDEO_COLUMNS
    }
    values["requested"] = values["requested"] or []
    values["skipped"] = values["skipped"] or []
    return Video(**values, renditions=renditions)


def _renditions_of(conn: sqlite3.Connection, video_ids: list[str]) -> dict[str, list[Rendition]]:
    found: dict[str, list[Rendition]] = {}
    if not video_ids:
        return found
    rows = conn.execute(
        f"SELECT * FROM renditions WHERE video_id IN ({', '.join('?' * len(video_ids))}) ORDER BY video_id, position",
        video_ids,
    ).fetchall()
    for r in rows:
        rendition = Rendition(
            r["name"], r["uri"], r["width"], r["height"], r["bitrate"], r["size_bytes"], r["duration_s"]
        )
        found.setdefault(r["video_id"], []).append(rendition)
    return found


def _encode_cursor(row: int) -> str:
    return f"r{row}"


def _decode_cursor(cursor: str) -> int:
    # The API's pattern (CURSOR_PATTERN) already holds; this guards direct callers.
    if CURSOR.fullmatch(cursor) is None:
        raise InvalidInput("query.cursor", "the next_cursor of a previous page")
    return int(cursor[1:])


# -- the autoscaler's history ---------------------------------------------------------------------


def add_scaling(conn: sqlite3.Connection, point: ScalingPoint, keep: int) -> None:
    """Record one change, keeping the latest `keep`."""
    conn.execute(
        "INSERT INTO scaling (at, from_workers, to_workers, backlog, in_flight, reason) VALUES (?, ?, ?, ?, ?, ?)",
        (point.at, point.from_, point.to, point.backlog, point.in_flight, point.reason),
    )
    conn.execute("DELETE FROM scaling WHERE seq <= (SELECT MAX(seq) FROM scaling) - ?", (keep,))


def scaling_history(conn: sqlite3.Connection, limit: int) -> list[ScalingPoint]:
    """The latest `limit` changes, oldest first."""
    rows = conn.execute("SELECT * FROM scaling ORDER BY at DESC, seq DESC LIMIT ?", (limit,)).fetchall()
    return [
        ScalingPoint(r["at"], r["from_workers"], r["to_workers"], r["backlog"], r["in_flight"], r["reason"])
        for r in reversed(rows)
    ]
