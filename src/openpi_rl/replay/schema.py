"""The replay store's SQLite schema, in one place, and the connection settings every opener uses.

`transitions` is the index of served action chunks (observation bytes live in segment files,
see `segments.py`); `episodes` aggregates them per (robot, episode); `reward_events` holds human
feedback as it arrived; `meta` holds small key/value facts (the boot epoch).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgpack
import numpy as np

SCHEMA_VERSION = 2
# Version 2 (reward bridge): reward_events gained episode_id, status and client_time.
MIGRATIONS = {
    1: (
        "ALTER TABLE reward_events ADD COLUMN episode_id TEXT",
        "ALTER TABLE reward_events ADD COLUMN status TEXT",
        "ALTER TABLE reward_events ADD COLUMN client_time REAL",
    ),
}
DB_NAME = "replay.sqlite"
SEGMENTS_DIR = "segments"

# Text affinity on robot_id/episode_id: an int episode id given by a client is stored as text,
# and a query with either form matches.
SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY,
    robot_id TEXT NOT NULL,
    episode_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    policy_version INTEGER NOT NULL,
    t_mono REAL NOT NULL,
    t_wall REAL NOT NULL,
    seg INTEGER NOT NULL,
    off INTEGER NOT NULL,
    len INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    actions BLOB NOT NULL,
    policy_actions BLOB,
    logp REAL NOT NULL,
    value REAL NOT NULL,
    reward REAL NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    truncated INTEGER NOT NULL DEFAULT 0,
    intervened INTEGER NOT NULL DEFAULT 0,
    executed_actions BLOB,
    consumed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS transitions_robot_episode ON transitions (robot_id, episode_id, id);
CREATE INDEX IF NOT EXISTS transitions_episode ON transitions (episode_id);
CREATE INDEX IF NOT EXISTS transitions_version ON transitions (policy_version, id);
CREATE INDEX IF NOT EXISTS transitions_robot_time ON transitions (robot_id, t_wall);
CREATE INDEX IF NOT EXISTS transitions_seg ON transitions (seg);
CREATE TABLE IF NOT EXISTS episodes (
    robot_id TEXT NOT NULL,
    episode_id TEXT NOT NULL,
    first_transition INTEGER NOT NULL,
    last_transition INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    ep_return REAL NOT NULL DEFAULT 0,
    ended INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (robot_id, episode_id)
);
CREATE TABLE IF NOT EXISTS reward_events (
    id INTEGER PRIMARY KEY,
    robot_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    value REAL NOT NULL,
    operator TEXT,
    t REAL NOT NULL,
    t_wall REAL NOT NULL,
    idempotency_key TEXT UNIQUE,
    transition_id INTEGER,  -- NULL: stored but not attached (see status)
    episode_id TEXT,
    status TEXT,            -- credit assignment's verdict: attached, unknown_robot, ...
    client_time REAL        -- the pendant clock, kept for the record (credit uses t)
);
CREATE INDEX IF NOT EXISTS reward_events_robot_t ON reward_events (robot_id, t);
CREATE INDEX IF NOT EXISTS reward_events_transition ON reward_events (transition_id);
CREATE INDEX IF NOT EXISTS reward_events_episode ON reward_events (robot_id, episode_id);
"""


def db_path(root: Path) -> Path:
    return root / DB_NAME


def connect_writer(
    root: Path, busy_timeout_s: float = 5.0, journal_size_limit: int = 4 << 20
) -> sqlite3.Connection:
    """Open (creating if needed) the store's database for the single writer: WAL mode,
    synchronous=NORMAL (a commit is durable against a killed process; against power loss only
    after the next WAL sync, see `ReplayConfig.fsync_interval_s`), schema applied.

    A new database is created with auto_vacuum=INCREMENTAL, so retention can give the pages of
    deleted rows back to the file system (`incremental_vacuum`); on an older file the pragma is a
    no-op (see `enable_incremental_vacuum`). journal_size_limit: a WAL that restarts is cut back
    to this many bytes instead of keeping its peak size."""
    conn = sqlite3.connect(db_path(root), isolation_level=None, check_same_thread=False)
    # Only takes effect before the first table exists, i.e. when this call creates the file.
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute(f"PRAGMA journal_size_limit={int(journal_size_limit)}")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise RuntimeError(f"{db_path(root)}: journal_mode: expected wal, got {mode}")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    conn.execute("BEGIN IMMEDIATE")
    row = _version(conn)
    while row is not None and row in MIGRATIONS:
        for stmt in MIGRATIONS[row]:
            conn.execute(stmt)
        row += 1
        conn.execute("UPDATE schema_version SET version = ?", (row,))
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)
    row = _version(conn)
    if row is None:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    elif row != SCHEMA_VERSION:
        conn.execute("ROLLBACK")
        raise RuntimeError(f"{db_path(root)}: schema_version: expected {SCHEMA_VERSION}, got {row}")
    conn.execute("COMMIT")
    return conn


def incremental_vacuum(conn: sqlite3.Connection) -> bool:
    """Whether the database gives freed pages back to the file system on `incremental_vacuum`."""
    return conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


def enable_incremental_vacuum(conn: sqlite3.Connection) -> bool:
    """Convert a database created before auto_vacuum=INCREMENTAL (its file never shrinks: freed
    pages are only reused) by rewriting it once with VACUUM. Needs no other connection in a
    transaction and free disk for a copy of the index; returns False (nothing changed) when it
    cannot run now. Segment files are not touched, so this costs what the index weighs."""
    if incremental_vacuum(conn):
        return True
    try:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")
    except sqlite3.OperationalError:
        return False
    return incremental_vacuum(conn)


def _version(conn: sqlite3.Connection) -> int | None:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    row = exists and conn.execute("SELECT version FROM schema_version").fetchone()
    return row[0] if row else None


def connect_reader(root: Path) -> sqlite3.Connection:
    """A read-only connection; safe to use while a writer (in any process) is running."""
    path = db_path(root)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no replay database (has a writer ever opened {root}?)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def pack_array(a: np.ndarray | None) -> bytes | None:
    """An array as msgpack `{__ndarray__, data, dtype, shape}`, the wire codec's layout."""
    if a is None:
        return None
    a = np.ascontiguousarray(a)
    return msgpack.packb(
        {"__ndarray__": True, "data": a.tobytes(), "dtype": a.dtype.str, "shape": list(a.shape)}
    )


def unpack_array(b: bytes | None) -> np.ndarray | None:
    if b is None:
        return None
    d = msgpack.unpackb(b)
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])
