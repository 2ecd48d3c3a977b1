"""The catalog's tables and their rows: plain functions of a connection (`services.common.db`), on either engine.

videos      one row per video (a tombstone once deleted); JSON columns for master, probe, name lists
renditions  the renditions of each video, in the order processing listed them
applied     source+id of every event applied (recent ones: repeats are recognized, not re-applied)
scaling     the autoscaler's changes, each instance's, bounded, for the chart
instances   each processing instance's workers as last reported (for instances quiet longer than `scaling` keeps)
outbox      events owed to the router (see `services.common.outbox`)

On PostgreSQL they live in the `store` schema, and every change of a video or the autoscaler's
history is announced on the `store_changes` channel (a trigger), so each store replica can show
its pages what another replica applied (`services.store.peers`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from services.common.db import Connection, Migrations, Row
from services.common.errors import InvalidInput
from services.store.fleet import InstanceWorkers, ScalingHistory, fleet_history
from services.store.records import Rendition, ScalingPoint, Video

POSTGRES_SCHEMA = "store"
CHANGES_CHANNEL = "store_changes"
VERSIONS = "video_version"
"""The counter every video's `version` is drawn from."""

SQLITE_TABLES = """
CREATE TABLE IF NOT EXISTS videos (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    video_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    title TEXT,
    description TEXT,
    master TEXT,
    probe TEXT,
    requested TEXT NOT NULL DEFAULT '[]',
    skipped TEXT NOT NULL DEFAULT '[]',
    poster_uri TEXT,
    error TEXT,
    last_error TEXT,
    progress REAL,
    speed REAL,
    attempt INTEGER,
    worker TEXT,
    elapsed_s REAL,
    round INTEGER NOT NULL DEFAULT 0,
    edits INTEGER NOT NULL DEFAULT 0,
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
    reason TEXT NOT NULL,
    instance TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS scaling_by_time ON scaling (at);
CREATE TABLE IF NOT EXISTS instances (
    instance TEXT PRIMARY KEY,
    at REAL NOT NULL,
    workers INTEGER NOT NULL
);
"""

POSTGRES_TABLES = """
CREATE TABLE videos (
    row BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    video_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    title TEXT,
    description TEXT,
    master TEXT,
    probe TEXT,
    requested TEXT NOT NULL DEFAULT '[]',
    skipped TEXT NOT NULL DEFAULT '[]',
    poster_uri TEXT,
    error TEXT,
    last_error TEXT,
    progress DOUBLE PRECISION,
    speed DOUBLE PRECISION,
    attempt INTEGER,
    worker TEXT,
    elapsed_s DOUBLE PRECISION,
    round INTEGER NOT NULL DEFAULT 0,
    edits INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    version BIGINT NOT NULL
);
CREATE INDEX videos_by_status ON videos (status, row);
CREATE INDEX videos_by_version ON videos (version);
CREATE TABLE renditions (
    video_id TEXT NOT NULL,
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    uri TEXT NOT NULL,
    width INTEGER,
    height INTEGER,
    bitrate BIGINT,
    size_bytes BIGINT,
    duration_s DOUBLE PRECISION,
    PRIMARY KEY (video_id, name)
);
CREATE TABLE applied (
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (source, id)
);
CREATE INDEX applied_by_time ON applied (at);
CREATE TABLE scaling (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    from_workers INTEGER NOT NULL,
    to_workers INTEGER NOT NULL,
    backlog BIGINT NOT NULL,
    in_flight BIGINT NOT NULL,
    reason TEXT NOT NULL,
    instance TEXT NOT NULL DEFAULT ''
);
CREATE INDEX scaling_by_time ON scaling (at);
CREATE TABLE instances (
    instance TEXT PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    workers INTEGER NOT NULL
);
"""

# Columns added before catalogs had versions: a file from then may lack them (the CREATE TABLE IF NOT EXISTS
# of step 1 leaves its table as it was) or have them already, so step 3 looks before it adds.
_COLUMNS_FROM_BEFORE_VERSIONS = {
    "videos": {"description": "TEXT", "edits": "INTEGER NOT NULL DEFAULT 0"},
    "scaling": {"instance": "TEXT NOT NULL DEFAULT ''"},
}


def _add_missing_columns(conn: Connection) -> None:
    for table, columns in _COLUMNS_FROM_BEFORE_VERSIONS.items():
        present = {row[1] for row in conn.fetch(f"PRAGMA table_info({table})")}
        for name, declaration in columns.items():
            if name not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")


CATALOG = Migrations(
    "catalog",
    sqlite=(
        SQLITE_TABLES,
        # 2: versions from a counter (a catalog from before goes on from its highest version).
        f"INSERT INTO sequences (name, value) SELECT '{VERSIONS}', COALESCE(MAX(version), 0) FROM videos WHERE true"
        " ON CONFLICT (name) DO NOTHING;",
        # 3: descriptions, edits and scaling instances, for a file from before them (step 1 made missing tables).
        _add_missing_columns,
        # 4: the HLS master playlist of a ready video (null for one made before HLS packaging).
        "ALTER TABLE videos ADD COLUMN hls_uri TEXT;",
        # 5: a failure whose master was rejected, which no retry can change.
        "ALTER TABLE videos ADD COLUMN input_rejected INTEGER NOT NULL DEFAULT 0;",
    ),
    postgres=(
        POSTGRES_TABLES,
        # 2: versions from a sequence, and every change announced to the other replicas (after commit, by NOTIFY).
        f"""
CREATE SEQUENCE {VERSIONS};
CREATE FUNCTION announce_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANGES_CHANNEL}', json_build_object(
        'origin', current_setting('application_name'),
        'table', TG_TABLE_NAME,
        'key', to_jsonb(NEW) ->> TG_ARGV[0])::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER videos_changed AFTER INSERT OR UPDATE ON videos
    FOR EACH ROW EXECUTE FUNCTION announce_change('video_id');
CREATE TRIGGER scaling_changed AFTER INSERT ON scaling
    FOR EACH ROW EXECUTE FUNCTION announce_change('seq');
""",
        # 3: the HLS master playlist of a ready video (null for one made before HLS packaging).
        "ALTER TABLE videos ADD COLUMN hls_uri TEXT;",
        # 4: a failure whose master was rejected, which no retry can change.
        "ALTER TABLE videos ADD COLUMN input_rejected BOOLEAN NOT NULL DEFAULT false;",
    ),
)

_VIDEO_COLUMNS = (
    "video_id", "status", "title", "description", "master", "probe", "requested", "skipped", "poster_uri", "hls_uri",
    "error", "last_error", "input_rejected", "progress", "speed", "attempt", "worker", "elapsed_s", "round", "edits",
    "created_at", "updated_at", "version",
)  # fmt: skip
_JSON_COLUMNS = frozenset({"master", "probe", "requested", "skipped"})


@dataclass(frozen=True)
class Page:
    items: list[Video]
    next_cursor: str | None


# -- events applied -------------------------------------------------------------------------------


def first_time(conn: Connection, source: str, event_id: str, now: float) -> bool:
    """Record the event as applied; False when it already was (a repeat)."""
    inserted = conn.execute(
        "INSERT INTO applied (source, id, at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", source, event_id, now
    )
    return inserted == 1


def forget_applied(conn: Connection, before: float) -> None:
    conn.execute("DELETE FROM applied WHERE at < ?", before)


# -- videos ---------------------------------------------------------------------------------------


def load_video(conn: Connection, video_id: str) -> Video | None:
    row = conn.fetchrow("SELECT * FROM videos WHERE video_id = ?", video_id)
    if row is None:
        return None
    return _video(row, _renditions_of(conn, [video_id]).get(video_id, []))


def write_video(conn: Connection, video: Video, now: float) -> None:
    """Write the video with a new version, higher than any other video's."""
    video.version = conn.next_value(VERSIONS)
    video.updated_at = now
    values = [
        json.dumps(getattr(video, name)) if name in _JSON_COLUMNS else getattr(video, name) for name in _VIDEO_COLUMNS
    ]
    updates = ", ".join(f"{name} = excluded.{name}" for name in _VIDEO_COLUMNS[1:])
    conn.execute(
        f"INSERT INTO videos ({', '.join(_VIDEO_COLUMNS)}) VALUES ({', '.join('?' * len(_VIDEO_COLUMNS))}) "
        f"ON CONFLICT (video_id) DO UPDATE SET {updates}",
        *values,
    )
    conn.execute("DELETE FROM renditions WHERE video_id = ?", video.video_id)
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


def list_videos(conn: Connection, limit: int, cursor: str | None, status: str | None) -> Page:
    """Newest first (in the order the catalog first heard of them); deleted ones only when `status` asks."""
    clauses: list[str] = ["status = ?"] if status else ["status != 'deleted'"]
    params: list[Any] = [status] if status else []
    if cursor is not None:
        clauses.append("row < ?")
        params.append(_decode_cursor(cursor))
    rows = conn.fetch(
        f"SELECT * FROM videos WHERE {' AND '.join(clauses)} ORDER BY row DESC LIMIT ?", *params, limit + 1
    )
    more = len(rows) > limit
    rows = rows[:limit]
    renditions = _renditions_of(conn, [row["video_id"] for row in rows])
    items = [_video(row, renditions.get(row["video_id"], [])) for row in rows]
    return Page(items, _encode_cursor(rows[-1]["row"]) if more else None)


def status_counts(conn: Connection) -> dict[str, int]:
    return {row[0]: row[1] for row in conn.fetch("SELECT status, COUNT(*) FROM videos GROUP BY status")}


def _video(row: Row, renditions: list[Rendition]) -> Video:
    values = {
        name: json.loads(row[name]) if name in _JSON_COLUMNS and row[name] else row[name] for name in _VIDEO_COLUMNS
    }
    values["requested"] = values["requested"] or []
    values["skipped"] = values["skipped"] or []
    values["input_rejected"] = bool(values["input_rejected"])  # SQLite keeps a boolean as 0 or 1
    return Video(**values, renditions=renditions)


def _renditions_of(conn: Connection, video_ids: list[str]) -> dict[str, list[Rendition]]:
    found: dict[str, list[Rendition]] = {}
    if not video_ids:
        return found
    rows = conn.fetch(
        f"SELECT * FROM renditions WHERE video_id IN ({', '.join('?' * len(video_ids))}) ORDER BY video_id, position",
        *video_ids,
    )
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


def add_scaling(conn: Connection, point: ScalingPoint, keep: int) -> int:
    """Record one change, keeping the latest `keep`; its row number."""
    seq = conn.fetchval(
        "INSERT INTO scaling (at, from_workers, to_workers, backlog, in_flight, reason, instance)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING seq",
        point.at, point.from_, point.to, point.backlog, point.in_flight, point.reason, point.instance,
    )  # fmt: skip
    # The instance's latest report wins, whatever order the reports arrive in.
    conn.execute(
        "INSERT INTO instances (instance, at, workers) VALUES (?, ?, ?) ON CONFLICT (instance) DO UPDATE"
        " SET at = excluded.at, workers = excluded.workers WHERE excluded.at >= instances.at",
        point.instance,
        point.at,
        point.to,
    )
    conn.execute("DELETE FROM scaling WHERE seq <= (SELECT MAX(seq) FROM scaling) - ?", keep)
    # An instance at 0 whose changes are no longer kept adds nothing: forget it (machines come and go).
    conn.execute("DELETE FROM instances WHERE workers = 0 AND at < (SELECT MIN(at) FROM scaling)")
    return int(seq)


def scaling_history(conn: Connection, limit: int) -> ScalingHistory:
    """The latest `limit` changes, oldest first, each with the fleet after it."""
    rows = conn.fetch("SELECT * FROM scaling ORDER BY at DESC, seq DESC LIMIT ?", limit)
    points = [
        ScalingPoint(
            r["at"], r["from_workers"], r["to_workers"], r["backlog"], r["in_flight"], r["reason"], r["instance"],
            seq=r["seq"],
        )
        for r in reversed(rows)
    ]  # fmt: skip
    last_heard = [InstanceWorkers(r["instance"], r["workers"], r["at"]) for r in conn.fetch("SELECT * FROM instances")]
    return fleet_history(points, last_heard)


def scaling_point(conn: Connection, seq: int, limit: int) -> ScalingPoint | None:
    """One recorded change by its row number, with the fleet after it (None once the history no longer keeps it)."""
    return next((p for p in scaling_history(conn, limit).points if p.seq == seq), None)
