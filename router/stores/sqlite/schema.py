"""The SQLite bus's tables. The log (`events`) is append-only; `messages` holds each subscription's
pending deliveries (a row per event per subscription, deleted on ack); `dead_letters` what was given up on;
`catalog` one counter moved on by every change to the subscriptions (router.fanout reloads on it).

`migrate` brings a database made by an older router forward (columns added since, with defaults).
"""

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    partitionkey TEXT,
    appended_at INTEGER NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (source, id)
);
CREATE INDEX IF NOT EXISTS events_appended_at ON events (appended_at);
CREATE TABLE IF NOT EXISTS subscriptions (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    start_seq INTEGER NOT NULL,
    delivered_total INTEGER NOT NULL DEFAULT 0,
    failed_total INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS catalog (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    version INTEGER NOT NULL
);
INSERT OR IGNORE INTO catalog (only_row, version) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS messages (
    msg_id INTEGER PRIMARY KEY AUTOINCREMENT,
    sub TEXT NOT NULL,
    seq INTEGER NOT NULL,
    pkey TEXT,
    replay TEXT,
    enqueued_at INTEGER NOT NULL,
    visible_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    holder TEXT,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_visibility ON messages (sub, visible_at, msg_id);
CREATE INDEX IF NOT EXISTS messages_by_key ON messages (sub, pkey, seq) WHERE pkey IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_by_seq ON messages (seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    dl_id INTEGER PRIMARY KEY AUTOINCREMENT,
    sub TEXT NOT NULL,
    seq INTEGER NOT NULL,
    replay TEXT,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    context TEXT NOT NULL DEFAULT '{}',
    dead_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_sub ON dead_letters (sub, dl_id);
CREATE INDEX IF NOT EXISTS dead_letters_by_seq ON dead_letters (seq);
CREATE TABLE IF NOT EXISTS replays (
    sub TEXT NOT NULL,
    name TEXT NOT NULL,
    from_seq INTEGER NOT NULL,
    to_seq INTEGER NOT NULL,
    total INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (sub, name)
);
"""

ADDED_COLUMNS = {
    "subscriptions": [("version", "INTEGER NOT NULL DEFAULT 0")],
    "messages": [("holder", "TEXT")],
}
"""Columns added after the first release: `version` is the stats change counter, `holder` the replica
holding a message's lease."""


def migrate(conn: sqlite3.Connection) -> None:
    for table, columns in ADDED_COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, decl in columns:
            if name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
