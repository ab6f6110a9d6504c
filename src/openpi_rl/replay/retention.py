"""Retention: keeps a replay directory within its row cap and its byte cap.

On disk a store is its segment files, the database file, the WAL and the WAL's shared-memory
index. The writer keeps the WAL to about `DiskBudget.wal_bytes` (checkpoint and truncate,
`checkpoint.py`), so the cap is split into a reserve for the WAL and the share the segments and
the database file may use. `Retention.apply`, run by the writer's commit stage after each
commit, deletes the oldest rows past that share down to `LOW_WATER` of it, then the segment
files no row points into, and gives the database's free pages back (auto_vacuum=INCREMENTAL) as
far as the file itself is over the share. The arithmetic is in the free functions below.
"""

from __future__ import annotations

import dataclasses
import math
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from openpi_rl.replay import schema
from openpi_rl.replay.segments import segment_path

if TYPE_CHECKING:
    from openpi_rl.replay.checkpoint import WalCheckpointer
    from openpi_rl.replay.segments import SegmentWriter

log = structlog.get_logger("openpi_rl.replay")

LOW_WATER = 0.9
WAL_MIN_BYTES = 32 << 10
WAL_MAX_BYTES = 16 << 20
ROUNDS = 64  # bounded delete-and-measure rounds per commit (the next one goes on)


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
        larger still (a reader held its snapshot, so it could not be truncated) is counted as
        it is, plus the next commit, which lands on it before retention runs again."""
        assert self.cap is not None
        reserve = max(2 * self.wal_bytes, wal) + wal_step
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


@dataclasses.dataclass(eq=False)
class Retention:
    """Deletes the oldest rows, and the segment files no row points into, past the caps. Runs
    on the writer's commit stage thread, between commits, on the writer's connection.

    `seg_sizes` (segment -> bytes as far as committed rows reach), `unsynced` (segments the
    commit stage has still to fdatasync) and `counters` are the writer's own dicts, shared.
    `rows` is the number of stored transitions: the writer adds each commit's."""

    conn: sqlite3.Connection
    root: Path
    seg_dir: Path
    max_rows: int | None
    budget: DiskBudget
    shrinks: bool
    """Whether the database file can shrink (auto_vacuum=INCREMENTAL)."""
    rows: int
    store_bytes: int
    """Segments + database pages in use after the last retention (the next one predicts a
    commit's growth from it)."""
    seg_sizes: dict[int, int]
    unsynced: dict[int, SegmentWriter]
    counters: dict[str, int]
    growth: int = 0
    """About the most a commit adds to segments + pages (a slowly decaying max, as the WAL's
    `wal_step`): commits vary, and the next may be larger than the last."""

    def apply(self, wal_step: int, checkpointer: WalCheckpointer | None) -> None:
        """Both caps; `wal_step`: about the most a commit adds to the WAL. A lock held by
        another process puts retention off to the next commit."""
        try:
            self._apply_row_cap()
            self._apply_byte_cap(wal_step, checkpointer)
        except sqlite3.OperationalError as e:  # another process holds the lock: next commit
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            self.counters["retention_busy"] += 1
            log.warning("replay.retention_busy", path=str(self.root), error=str(e))

    def _apply_row_cap(self) -> None:
        max_rows = self.max_rows
        if max_rows is None or self.rows <= max_rows:
            return
        cut = self.conn.execute(
            "SELECT id FROM transitions ORDER BY id DESC LIMIT 1 OFFSET ?", (max_rows,)
        ).fetchone()
        if cut is not None:
            self._delete_rows("id <= ?", (cut[0],))
        self._drop_unreferenced_segments()

    def _apply_byte_cap(self, wal_step: int, checkpointer: WalCheckpointer | None) -> None:
        """Keep segments + database file within the cap's share (`DiskBudget`).

        Rows are deleted oldest first, by id rather than by whole segment (with state-only robots
        one segment holds thousands of rows, more than the share), when the segments and the
        pages in use (plus what the last commit added: the next one will add about as much)
        pass the share, down to LOW_WATER of it; segment files go once no row points into them.
        Freed pages are reused by new rows; they are given back to the file system
        (`incremental_vacuum`) only as far as the file itself is over the share, so steady
        writing costs no page moves. Each round writes at most about a quarter of `wal_bytes`
        to the WAL and the WAL is checked after it, so retention cannot outgrow the WAL's
        reserve either."""
        budget = self.budget
        if budget.cap is None:
            return
        segs, in_use, file = self._store()
        self.growth = max(segs + in_use - self.store_bytes, self.growth * 63 // 64, 0)
        growth = self.growth
        page = page_size(self.conn)
        round_pages = max(1, budget.wal_bytes // 4 // page)
        goal = None  # once past the share: delete down to LOW_WATER of it
        for _ in range(ROUNDS):
            share = budget.store_share(*wal_files_bytes(self.root), wal_step) - self._stuck(file)
            if goal is None and segs + in_use + growth > share:
                goal = int(LOW_WATER * max(share, 0))
            excess = 0 if goal is None else segs + in_use + growth - goal
            if excess > 0 and self.rows > 0:
                k = rows_to_delete(excess, self.rows, segs + in_use)
                k = min(k, max(1, round_pages * page * self.rows // max(in_use, 1)))
                cut = self.conn.execute(
                    "SELECT id FROM transitions ORDER BY id LIMIT 1 OFFSET ?", (k - 1,)
                ).fetchone()
                if cut is None:
                    break
                # Rows go first (committed), then files: a crash in between leaves an
                # unreferenced file (deleted at the next retention), never a row without bytes.
                self._delete_rows("id <= ?", (cut[0],))
                self._drop_unreferenced_segments()
            elif self.shrinks and segs + file + growth > share and file > in_use:
                # The next commit's rows land in the free pages, its segment bytes do not.
                self._vacuum(min(round_pages, -(-(segs + file + growth - share) // page)))
            else:
                break
            if checkpointer is not None:
                checkpointer.check(self.conn)
            segs, in_use, file = self._store()
        self.store_bytes = segs + in_use

    def _stuck(self, file: int) -> int:
        """Bytes the database file holds on disk beyond what the next checkpoint leaves (pages a
        vacuum freed while a reader's snapshot held the checkpoint back): counted like a WAL
        that could not be truncated, since only that checkpoint gives them back."""
        try:
            return max(0, schema.db_path(self.root).stat().st_size - file)
        except OSError:
            return 0

    def _store(self) -> tuple[int, int, int]:
        """(segment bytes, database pages in use, database file bytes after the next
        checkpoint). A file that cannot shrink (created without auto_vacuum) counts as its pages
        in use: that is what retention can act on."""
        in_use, file = db_bytes(self.conn)
        return sum(self.seg_sizes.values()), in_use, file if self.shrinks else in_use

    def _vacuum(self, pages: int | None = None) -> None:
        """Give up to `pages` (all: None) free pages of the database back to the file system
        (when created with auto_vacuum=INCREMENTAL). The file shrinks at the next complete
        checkpoint."""
        if not self.shrinks:
            return
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        n = free if pages is None else min(free, pages)
        if n > 0:
            # One page per step: fetchall runs it to the end.
            self.conn.execute(f"PRAGMA incremental_vacuum({int(n)})").fetchall()
            self.counters["retention_pages_vacuumed"] += n

    def _delete_rows(self, where: str, args: tuple) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        n = conn.execute(f"DELETE FROM transitions WHERE {where}", args).rowcount
        conn.execute(
            "DELETE FROM episodes WHERE last_transition <"
            " coalesce((SELECT min(id) FROM transitions), 1 << 62)"
        )
        conn.execute("COMMIT")
        self.rows -= n
        self.counters["retention_rows_deleted"] += n

    def _drop_unreferenced_segments(self) -> None:
        min_seg = self.conn.execute("SELECT min(seg) FROM transitions").fetchone()[0]
        current = max(self.seg_sizes, default=None)
        for seg in sorted(self.seg_sizes):
            if seg == current or (min_seg is not None and seg >= min_seg):
                break
            self._unlink_segment(seg)

    def _unlink_segment(self, seg: int) -> None:
        segment_path(self.seg_dir, seg).unlink(missing_ok=True)
        self.seg_sizes.pop(seg, None)
        retired = self.unsynced.pop(seg, None)
        if retired is not None:
            retired.close()
        self.counters["retention_segments_deleted"] += 1
        log.info("replay.segment_deleted", segment=seg)
