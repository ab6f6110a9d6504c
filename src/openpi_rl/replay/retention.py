"""The byte cap's arithmetic: what a replay directory weighs on disk and how much to delete.

On disk a store is its segment files, the database file, the WAL and the WAL's shared-memory
index. The writer keeps the WAL to about `DiskBudget.wal_bytes` (checkpoint and truncate,
`checkpoint.py`), so the cap is split into a reserve for the WAL and the share the segments and
the database file may use. Retention (`ReplayWriter._apply_byte_cap`) deletes past that share
down to `LOW_WATER` of it, and gives the database's free pages back (auto_vacuum=INCREMENTAL)
as far as the file itself is over the share.
"""

from __future__ import annotations

import dataclasses
import math
import sqlite3
from pathlib import Path

from openpi_rl.replay import schema

LOW_WATER = 0.9
WAL_MIN_BYTES = 32 << 10
WAL_MAX_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class DiskBudget:
    cap: int | None
    """The most bytes the directory may hold (None: no cap)."""
    wal_bytes: int
    """Checkpoint and truncate the WAL once it is this large."""

    @classmethod
    def make(cls, cap: int | None, wal_bytes: int | None = None) -> DiskBudget:
        """wal_bytes defaults to a sixteenth of the cap, within [32 KiB, 16 MiB]: small enough
        for the cap, large enough that a checkpoint (two fsyncs) copies more than a few pages."""
        if wal_bytes is None:
            wal_bytes = WAL_MAX_BYTES if cap is None else cap // 16
            wal_bytes = min(WAL_MAX_BYTES, max(WAL_MIN_BYTES, wal_bytes))
        return cls(cap, int(wal_bytes))

    def store_share(self, wal: int, shm: int, wal_step: int = 0) -> int:
        """Bytes segments + database file may use next to a WAL of `wal` bytes and an shm of
        `shm`, when one commit adds about `wal_step` bytes to the WAL. The commit stage truncates
        the WAL at the latest once it reaches 1.5 `wal_bytes` (`checkpoint.py`), so the reserve
        is that plus a commit, with room for a commit larger than the last ones; a WAL that is
        larger still (a reader held its snapshot) is counted as it is."""
        assert self.cap is not None
        reserve = max(2 * self.wal_bytes + wal_step, wal)
        return self.cap - reserve - shm


def rows_to_delete(excess: int, rows: int, store: int) -> int:
    """How many of the oldest rows free about `excess` bytes, from the store's average bytes per
    row (segment bytes and index pages together): in [1, rows], 0 when there are none."""
    if rows <= 0 or excess <= 0:
        return 0
    return max(1, min(rows, math.ceil(excess * rows / max(store, 1))))


def wal_files_bytes(root: Path) -> tuple[int, int]:
    """(WAL, shm) sizes on disk; 0 for a file that is not there."""
    db = schema.db_path(root)
    out = []
    for suffix in ("-wal", "-shm"):
        try:
            out.append(db.with_name(db.name + suffix).stat().st_size)
        except FileNotFoundError:
            out.append(0)
    return out[0], out[1]


def page_size(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA page_size").fetchone()[0]


def db_bytes(conn: sqlite3.Connection) -> tuple[int, int]:
    """(bytes of the pages in use, bytes of the database file after the next checkpoint)."""
    page, count, free = (
        conn.execute(f"PRAGMA {name}").fetchone()[0]
        for name in ("page_size", "page_count", "freelist_count")
    )
    return page * (count - free), page * count
