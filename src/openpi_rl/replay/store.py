"""A replay's database on either backend, for the code outside this package that runs its own
SQL on it (the learner's source, the bridge's status): `connect(location)` and `begin_write`.

The SQL is SQLite's spelling (`?` placeholders; `greatest` / `least` for scalar max / min), which
the PostgreSQL connection takes as it is (`postgres.Connection`). Keep to SQL both speak: no
`max()` of a boolean (PostgreSQL has none: `max(CASE WHEN ... THEN 1 ELSE 0 END)`), no PRAGMA.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from openpi_rl.replay import postgres, schema

Connection = Any  # sqlite3.Connection or postgres.Connection: the same execute / fetch API


def connect(location: str | Path, write: bool = False) -> Connection:
    """A connection to the replay at `location` (a directory or a postgresql:// URL), in
    autocommit mode: each statement sees what was committed when it started. `write=True`: one
    that may also write, in short transactions opened by `begin_write` (SQLite: waits up to 10 s
    for another writer's lock). FileNotFoundError if no writer ever created the replay there."""
    if postgres.is_url(location):
        return postgres.connect_reader(str(location))
    root = Path(location)
    if not write:
        return schema.connect_reader(root)
    schema.connect_reader(root).close()  # the same checks: it exists, in this format
    conn = sqlite3.connect(schema.db_path(root), isolation_level=None, check_same_thread=False)
    schema.add_functions(conn)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def begin_write(conn: Connection) -> None:
    """Open a write transaction (SQLite: take the write lock first, as the writers do)."""
    conn.execute("BEGIN" if isinstance(conn, postgres.Connection) else "BEGIN IMMEDIATE")


def unavailable_errors() -> tuple[type[Exception], ...]:
    """The errors that mean the replay's database cannot be reached now (PostgreSQL restarting,
    the network): a reader may wait and try again, as its connection reconnects on its next
    SELECT or BEGIN (`postgres.Connection.execute`). A SQLite replay raises none of these."""
    import psycopg

    return (psycopg.OperationalError,)


def is_postgres(location: str | Path | None) -> bool:
    """Whether `location` names a PostgreSQL replay (else a directory)."""
    return postgres.is_url(location)


def describe(location: str | Path) -> str:
    """The location as logs show it: an absolute directory, or the URL with its password masked."""
    return (
        postgres.describe(str(location))
        if is_postgres(location)
        else str(Path(location).absolute())
    )
