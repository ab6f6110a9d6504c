"""The replay's PostgreSQL schema, connections and the few things SQLite does differently.

A replay whose location is a `postgresql://` URL lives in one PostgreSQL database that any
number of policy servers (each its own writer, with its own boot epoch, so ids never collide),
reward bridges and learners reach over the network. The tables are SQLite's (`schema.py`) in
PostgreSQL's types, plus `observations` (the observation records, stored uncompressed and out of
line: `STORAGE EXTERNAL`) and `commits` (one marker per committed batch: after a connection lost
during COMMIT, a writer looks for its marker to know whether the batch landed).

`Connection` wraps a psycopg connection in autocommit mode (transactions are explicit `BEGIN` /
`COMMIT`, as the SQLite code does) and takes the replay's SQL as written for SQLite: `?`
placeholders, and `greatest` / `least` for the scalar max / min (registered on SQLite
connections, `schema.py`). So the queries of the reader, the commit stage and credit rules are
written once. psycopg is imported here only, when a URL is opened.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from openpi_rl.replay import schema
from openpi_rl.secret import mask_url

SCHEMES = ("postgresql://", "postgres://")
# pg_advisory locks: schema creation and migration; retention (one writer at a time runs it).
LOCK_SCHEMA = 0x6F70_6931  # "opi1"
LOCK_RETENTION = 0x6F70_6932
# pg_advisory_lock(LOCK_WRITERS, boot epoch): held by a live writer's session, so retention can
# tell a writer that is gone (its segment files may go once none of its rows is left).
LOCK_WRITERS = 0x6F70_6933
# meta key of a writer's segment directory (`ReplayConfig.observations_dir`), by boot epoch.
OBS_DIR_KEY = "observations_dir/"

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS transitions (
    id BIGINT PRIMARY KEY,
    robot_id TEXT NOT NULL,
    episode_id TEXT NOT NULL,
    step BIGINT NOT NULL,
    policy_version BIGINT NOT NULL,
    t_mono DOUBLE PRECISION NOT NULL,
    t_wall DOUBLE PRECISION NOT NULL,
    seg BIGINT NOT NULL,
    off BIGINT NOT NULL,
    len BIGINT NOT NULL,
    crc BIGINT NOT NULL,
    actions BYTEA NOT NULL,
    policy_actions BYTEA,
    logp DOUBLE PRECISION NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    reward DOUBLE PRECISION NOT NULL DEFAULT 0,
    done SMALLINT NOT NULL DEFAULT 0,
    truncated SMALLINT NOT NULL DEFAULT 0,
    intervened SMALLINT NOT NULL DEFAULT 0,
    executed_actions BYTEA,
    consumed SMALLINT NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS transitions_robot_episode ON transitions (robot_id, episode_id, id);
CREATE INDEX IF NOT EXISTS transitions_episode ON transitions (episode_id);
CREATE INDEX IF NOT EXISTS transitions_version ON transitions (policy_version, id);
CREATE INDEX IF NOT EXISTS transitions_robot_time ON transitions (robot_id, t_wall);
CREATE INDEX IF NOT EXISTS transitions_time ON transitions (t_wall);
CREATE TABLE IF NOT EXISTS observations (
    id BIGINT PRIMARY KEY REFERENCES transitions (id) ON DELETE CASCADE,
    bytes BYTEA NOT NULL
);
ALTER TABLE observations ALTER COLUMN bytes SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS episodes (
    robot_id TEXT NOT NULL,
    episode_id TEXT NOT NULL,
    first_transition BIGINT NOT NULL,
    last_transition BIGINT NOT NULL,
    steps BIGINT NOT NULL,
    ep_return DOUBLE PRECISION NOT NULL DEFAULT 0,
    ended SMALLINT NOT NULL DEFAULT 0,
    PRIMARY KEY (robot_id, episode_id)
);
CREATE TABLE IF NOT EXISTS reward_events (
    id BIGINT PRIMARY KEY,
    robot_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL,
    operator TEXT,
    t DOUBLE PRECISION NOT NULL,
    t_wall DOUBLE PRECISION NOT NULL,
    idempotency_key TEXT UNIQUE,
    transition_id BIGINT,
    episode_id TEXT,
    status TEXT,
    client_time DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS reward_events_robot_t ON reward_events (robot_id, t);
CREATE INDEX IF NOT EXISTS reward_events_transition ON reward_events (transition_id);
CREATE INDEX IF NOT EXISTS reward_events_episode ON reward_events (robot_id, episode_id);
CREATE TABLE IF NOT EXISTS commits (
    writer BIGINT NOT NULL,
    batch BIGINT NOT NULL,
    t_wall DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (writer, batch)
);
"""
# Migrations from version n to n + 1, as for SQLite (`schema.MIGRATIONS`); none yet: PostgreSQL
# stores start at the current format.
MIGRATIONS: dict[int, tuple[str, ...]] = {}


def is_url(location: object) -> bool:
    """Whether a replay location names a PostgreSQL database rather than a directory."""
    return isinstance(location, str) and location.startswith(SCHEMES)


def describe(url: str) -> str:
    """The URL as logs and errors show it (password masked)."""
    return mask_url(url)


COPY_MAX_BYTES = 16 << 10
_PLAIN_INSERT = re.compile(
    r"\s*INSERT\s+INTO\s+(\w+)\s*(\([^()]*\))\s*VALUES\s*\([?,\s]*\)\s*", re.IGNORECASE
)


@functools.cache
def _copy_of(sql: str) -> str | None:
    """`COPY t (cols) FROM STDIN` for a plain single-row INSERT (no ON CONFLICT, RETURNING...)."""
    m = _PLAIN_INSERT.fullmatch(sql)
    return None if m is None else f"COPY {m[1]} {m[2]} FROM STDIN"


@functools.cache
def _to_pyformat(sql: str) -> str:
    """SQLite's `?` placeholders as psycopg's `%s` (a literal `%` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class Connection:
    """The subset of `sqlite3.Connection` the replay uses, on a psycopg connection:
    `execute(sql, params)` (a cursor: `fetchone`, `fetchall`, `rowcount`, iteration),
    `executemany`, `in_transaction`, `close`."""

    def __init__(self, raw: Any, url: str):
        self.raw = raw
        self.url = url

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        import psycopg
        from psycopg.pq import TransactionStatus

        anew = sql.lstrip()[:6].upper() in ("SELECT", "BEGIN")
        if self.raw.closed and anew:
            # Lost earlier (the server restarted): a statement that starts something anew may
            # reconnect; one in the middle of a transaction may not (its transaction is gone).
            self.raw = connect(self.url).raw
        anew = anew and self.raw.info.transaction_status == TransactionStatus.IDLE
        try:
            return self.raw.execute(_to_pyformat(sql), tuple(params) or None)
        except psycopg.OperationalError:
            # A connection the server dropped since its last statement (a restart) fails the
            # next one; outside a transaction, that one is sent again on a new connection.
            if not (anew and self.raw.closed):
                raise
            self.raw = connect(self.url).raw
            return self.raw.execute(_to_pyformat(sql), tuple(params) or None)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """A plain `INSERT INTO t (cols) VALUES (?, ...)` of small rows runs as one COPY (psycopg
        formats the rows in C, one round trip: little GIL time taken from the serving thread);
        anything else row by row, pipelined: an upsert, and rows holding large byte strings
        (observation records), which COPY's text format would send hex-escaped."""
        rows = list(rows)
        if not rows:
            return
        large = max((len(v) for v in rows[0] if isinstance(v, bytes)), default=0) > COPY_MAX_BYTES
        copy = None if large else _copy_of(sql)
        with self.raw.cursor() as cur:
            if copy is None:
                cur.executemany(_to_pyformat(sql), rows)
                return
            with cur.copy(copy) as out:
                for row in rows:
                    out.write_row(row)

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def close(self) -> None:
        self.raw.close()


def connect(url: str, connect_timeout_s: float = 5.0) -> Connection:
    """An autocommit connection (psycopg.OperationalError when the server cannot be reached)."""
    import psycopg

    raw = psycopg.connect(url, autocommit=True, connect_timeout=max(1, round(connect_timeout_s)))
    return Connection(raw, url)


def connect_writer(url: str, connect_timeout_s: float = 5.0) -> Connection:
    """A connection for a writer: creates the schema (or migrates it) the first time, under an
    advisory lock so that servers starting together do it once. `ReplayFormatError` for a
    database written by a newer openpi-rl."""
    conn = connect(url, connect_timeout_s)
    try:
        conn.execute("BEGIN")
        conn.execute("SELECT pg_advisory_xact_lock(?)", (LOCK_SCHEMA,))
        version = _version(conn)
        while version is not None and version in MIGRATIONS:
            for stmt in MIGRATIONS[version]:
                conn.execute(stmt)
            version += 1
            conn.execute("UPDATE schema_version SET version = ?", (version,))
        if version is None:
            conn.execute(SCHEMA)  # DDL is transactional here: all of it or none
            conn.execute(
                "INSERT INTO schema_version (version) VALUES (?)", (schema.SCHEMA_VERSION,)
            )
        elif version != schema.SCHEMA_VERSION:
            raise _format_error(url, version)
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


def connect_reader(url: str, connect_timeout_s: float = 5.0) -> Connection:
    """A connection for reading; `FileNotFoundError` if no writer ever created the replay's
    tables there, `ReplayFormatError` for another format."""
    conn = connect(url, connect_timeout_s)
    version = _version(conn)
    if version != schema.SCHEMA_VERSION:
        conn.close()
        if version is None:
            raise FileNotFoundError(
                f"{describe(url)}: no replay tables (has a writer ever opened it?)"
            )
        raise _format_error(url, version)
    return conn


def _version(conn: Connection) -> int | None:
    exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
    row = exists and conn.execute("SELECT version FROM schema_version").fetchone()
    return row[0] if row else None


def _format_error(url: str, version: int) -> schema.ReplayFormatError:
    return schema.ReplayFormatError(
        f"replay database {describe(url)}: format {version}; this openpi-rl reads format "
        f"{schema.SCHEMA_VERSION}: upgrade openpi-rl, or give it another database",
        version < schema.SCHEMA_VERSION,
    )


def next_boot_epoch(conn: Connection) -> int:
    """Commit and return a writer's boot epoch: one more than any before, across every writer of
    the database (the row lock orders servers opening at once)."""
    row = conn.execute(
        "INSERT INTO meta (key, value) VALUES ('boot_epoch', '1') ON CONFLICT (key) DO UPDATE"
        " SET value = (meta.value::bigint + 1)::text RETURNING value"
    ).fetchone()
    return int(row[0])


def writer_dirs(conn: Connection) -> dict[int, Path]:
    """Boot epoch -> segment directory of each writer that keeps its observation records in
    segment files (`ReplayConfig.observations_dir`)."""
    rows = conn.execute(
        "SELECT key, value FROM meta WHERE key LIKE ?", (OBS_DIR_KEY + "%",)
    ).fetchall()
    return {int(k[len(OBS_DIR_KEY) :]): Path(v) for k, v in rows}


def relation_bytes(conn: Connection) -> int:
    """Bytes the replay's tables take on the server (heap, TOAST, indexes)."""
    row = conn.execute(
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = current_schema() AND c.relkind = 'r'"
    ).fetchone()
    return int(row[0])
