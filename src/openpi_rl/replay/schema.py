"""The replay store's SQLite schema, in one place, and the connection settings every opener uses.

`transitions` is the index of served action chunks (observation records live in segment files,
see `segments.py`; what the bytes hold is `records.py`); `episodes` aggregates them per (robot,
episode); `reward_events` holds human feedback as it arrived; `meta` holds small key/value facts
(the boot epoch, the migration's legacy boundary). `schema_version` is the directory's format:
a writer migrates an older one in place, a reader refuses it (`ReplayFormatError`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from openpi_rl.replay import records

SCHEMA_VERSION = 3
# Version 2 (reward bridge): reward_events gained episode_id, status and client_time.
# Version 3 (issue 14): the replay's own record format (records.py) instead of the robots'
# request bytes; the array columns are rewritten, the segment files are not.
MIGRATIONS: dict[int, tuple[str | Callable[[sqlite3.Connection], None], ...]] = {
    1: (
        "ALTER TABLE reward_events ADD COLUMN episode_id TEXT",
        "ALTER TABLE reward_events ADD COLUMN status TEXT",
        "ALTER TABLE reward_events ADD COLUMN client_time REAL",
    ),
    2: (records.migrate_request_payloads,),
}
FORMATS = {
    1: "format 1: observations stored as the robots' msgpack requests",
    2: "format 2: observations stored as the robots' msgpack requests",
    3: "format 3: the replay's own observation records",
}


class ReplayFormatError(RuntimeError):
    """A replay directory in a format this version does not read (the message says what to do);
    `older`: a writer of this version would migrate it."""

    def __init__(self, message: str, older: bool):
        super().__init__(message)
        self.older = older


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
    add_functions(conn)
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
            if callable(stmt):
                stmt(conn)
            else:
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
        conn.close()
        raise format_error(root, row)
    conn.execute("COMMIT")
    return conn


def add_functions(conn: sqlite3.Connection) -> None:
    """PostgreSQL's scalar `greatest` / `least` (SQLite spells them max / min with several
    arguments), so the replay's SQL is written once for both backends (`postgres.py`)."""
    conn.create_function("greatest", -1, max, deterministic=True)
    conn.create_function("least", -1, min, deterministic=True)


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


def format_error(root: Path, version: int) -> ReplayFormatError:
    """The refusal of a directory in format `version`, saying what to do about it."""
    what = FORMATS.get(version, f"format {version}")
    if version > SCHEMA_VERSION:
        todo = (
            f"it was written by a newer openpi-rl; this one reads format {SCHEMA_VERSION}: "
            "upgrade openpi-rl, or give this one another replay_dir"
        )
    else:
        todo = (
            f"this openpi-rl reads format {SCHEMA_VERSION}: run `openpi-rl replay migrate "
            f"{root}` (or start `openpi-rl serve` on it once) to migrate it in place, "
            "or move it aside and start a new replay"
        )
    return ReplayFormatError(f"replay directory {root}: {what}; {todo}", version < SCHEMA_VERSION)


def connect_reader(root: Path) -> sqlite3.Connection:
    """A read-only connection; safe to use while a writer (in any process) is running.
    `ReplayFormatError` for a directory in another format (a reader cannot migrate it)."""
    path = db_path(root)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no replay database (has a writer ever opened {root}?)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    add_functions(conn)
    conn.execute("PRAGMA busy_timeout=5000")
    version = _version(conn)
    if version is not None and version != SCHEMA_VERSION:
        conn.close()
        raise format_error(root, version)
    return conn


def legacy_max_id(conn: sqlite3.Connection) -> int:
    """Transitions with an id up to this hold a format-2 request as observation (records.py)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (records.LEGACY_MAX_ID_KEY,))
    value = row.fetchone()
    return int(value[0]) if value else 0
