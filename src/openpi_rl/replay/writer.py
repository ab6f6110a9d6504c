"""`ReplayWriter`: the transitions writer, owner of a replay directory (the policy server's).

Callers (the policy server's loop) get an id back at once and the row goes on a bounded queue.
The stage (`replay-stage`, `transitions.py`'s loop) checksums each observation and appends it to
the current segment file (unbuffered: the bytes are in the OS when the write returns), then hands
the row, now pointing at its bytes, to the commit stage (`replay-writer`, the `Committer`'s in
`committer.py`), which commits the SQLite transaction holding those rows every
`commit_interval_s` (guarantee 2: a `kill -9` loses at most the rows of one commit interval; an
event passed with `wait=True` is acknowledged only after its commit). With `fsync_interval_s`,
the commit stage fdatasyncs the segments before the commit that syncs the WAL. So a row never
commits before its bytes reached the OS (and, when syncing, the disk), while the checksum and
the copy into the page cache (~60 us for 150 kB, both GIL-free) overlap the SQLite work of
earlier rows instead of adding to it. WAL checkpoints run on a third thread
(`replay-checkpoint`, `checkpoint.py`), off the commit path, and keep the WAL within
`DiskBudget.wal_bytes`; retention (`retention.py`) keeps the whole directory under
`retention_max_bytes`. The items the stages pass each other, the batch a commit gathers and the
SQL that writes it are in `pipeline.py`; this module owns what the stage does to an append, the
files and the directory's owner lock. Reward events from another process (the reward bridge) go
through `ReplayEventsWriter` (`events_writer.py`), which writes beside this one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from openpi_rl.replay import postgres, retention, schema
from openpi_rl.replay.checkpoint import WalCheckpointer
from openpi_rl.replay.committer import COUNTERS
from openpi_rl.replay.committer import SEQ_BITS as SEQ_BITS  # re-exported: the writer's API
from openpi_rl.replay.committer import ReplayClosed as ReplayClosed
from openpi_rl.replay.committer import ReplayFull as ReplayFull
from openpi_rl.replay.pipeline import (
    APPEND,
    ROW,
    Batch,
    encode_append,
)
from openpi_rl.replay.pipeline import Credit as Credit  # re-exported: the writer's API
from openpi_rl.replay.pipeline import Resolve as Resolve
from openpi_rl.replay.pipeline import RewardEventResult as RewardEventResult
from openpi_rl.replay.recovery import RecoveryReport, recover
from openpi_rl.replay.segments import (
    SegmentAppender,
    SegmentWriter,
    list_segments,
    segment_path,
    sync_segments,
)
from openpi_rl.replay.transitions import TransitionsCommitter

if TYPE_CHECKING:
    from openpi_rl.replay.pg_writer import PgReplayWriter

log = structlog.get_logger("openpi_rl.replay")


class ReplayLocked(RuntimeError):
    """Another process writes this replay directory's transitions (one owner per directory)."""


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    path: Path | str
    """Where the store is: a directory (created if missing: `replay.sqlite` + `segments/`), or
    a `postgresql://` URL (`pg_writer.py`; many servers may share one database)."""
    commit_interval_s: float = 0.05
    """Rows are committed in batches at most this long after they were handed to the writer."""
    fsync_interval_s: float | None = None
    """None: never fsync (a `kill -9` loses nothing committed: the page cache outlives the
    process). A number: fdatasync segments and the WAL that often, against power loss."""
    max_queue: int = 4096
    segment_max_bytes: int = 256 * 2**20
    retention_max_rows: int | None = None
    """Keep at most this many transitions (oldest deleted first)."""
    retention_max_bytes: int | None = None
    """Keep the directory's bytes on disk (segment files, database file, WAL, shm) at most this:
    past the share left after the WAL's reserve (`retention.DiskBudget`), the oldest rows are
    deleted down to 90 % of it, segment files once no row points into them, and the database
    file gives the freed pages back. Choose it several times `segment_max_bytes` (the segment
    being written is never deleted). A database created before auto_vacuum is rewritten once
    (VACUUM) at open to make this possible; if that cannot run, its file keeps its peak size."""
    wal_max_bytes: int | None = None
    """Checkpoint and truncate the WAL once it is this large; None: a sixteenth of
    `retention_max_bytes` within [32 KiB, 16 MiB], or 16 MiB without a byte cap."""
    enqueue_timeout_s: float = 0.1
    """How long an append waits on a full queue before raising `ReplayFull`."""
    busy_timeout_s: float = 5.0
    """How long one commit waits for another process's write lock; past it the commit is
    rolled back and retried (counted as `commit_retries`), never dropped."""
    observations_dir: Path | str | None = None
    """A PostgreSQL replay's observation records in segment files under this directory (in
    `writer-<boot epoch>/`, one per writer) instead of its `observations` table: several times
    the ingest rate. Every reader must see it at the same path (a shared filesystem, as
    `checkpoint_dir`). Ignored for a directory replay (its segments are in it)."""

    def create(self) -> ReplayWriter | PgReplayWriter:
        """The writer for this location: SQLite for a directory, PostgreSQL for a URL."""
        if postgres.is_url(self.path):
            from openpi_rl.replay.pg_writer import PgReplayWriter

            return PgReplayWriter(self)
        return ReplayWriter(self)


class ReplayWriter(TransitionsCommitter):
    """Single writer of a replay directory's transitions. Thread-safe to call; `close()`
    flushes."""

    def __init__(self, config: ReplayConfig):
        if postgres.is_url(config.path):
            raise ValueError("a PostgreSQL replay's writer is made by ReplayConfig.create()")
        root = Path(config.path)
        self._seg_dir = root / schema.SEGMENTS_DIR
        self._seg_dir.mkdir(parents=True, exist_ok=True)
        # Recovery truncates segment tails and ids come from this process's boot epoch: a
        # second owner would corrupt both. The lock dies with the process (kill -9 too).
        self._lock_fd: int | None = _lock_owner(root)
        self._budget = retention.DiskBudget.make(config.retention_max_bytes, config.wal_max_bytes)
        conn = schema.connect_writer(
            root,
            busy_timeout_s=config.busy_timeout_s,
            journal_size_limit=self._budget.wal_bytes,
        )
        # Recovery truncates segment tails: only the owner of the segments may run it.
        self.recovery: RecoveryReport = recover(conn, self._seg_dir)
        counters = (
            *("transitions_committed", "bytes_committed", "reports_missing", *COUNTERS),
            *("retention_rows_deleted", "retention_segments_deleted"),
            *("retention_pages_vacuumed", "retention_busy"),
        )
        super().__init__(config, root, conn, counters)
        self.config: ReplayConfig = config

        segs = list_segments(self._seg_dir)
        # Stage: the file being appended to.
        self._appender = SegmentAppender(
            self._seg_dir,
            (segs[-1] + 1) if segs else 1,
            config.segment_max_bytes,
            syncing=config.fsync_interval_s is not None,
        )
        # Commit stage: sizes of the segments as far as its rows reach (retention reads them) and,
        # with fsync, the files it still has to sync; it closes a retired one after its sync.
        self._seg_sizes = {s: segment_path(self._seg_dir, s).stat().st_size for s in segs}
        self._unsynced: dict[int, SegmentWriter] = {}
        store_bytes = sum(self._seg_sizes.values()) + retention.db_bytes(conn)[0]
        self._wal_step = 0  # about the most a commit adds to the WAL
        rows = conn.execute("SELECT count(*) FROM transitions").fetchone()[0]
        # Whether the database file can shrink after retention deletes (see retention.py).
        shrinks = schema.incremental_vacuum(conn)
        if not shrinks and config.retention_max_bytes is not None:
            t0 = time.monotonic()
            shrinks = schema.enable_incremental_vacuum(conn)
            log.log(
                20 if shrinks else 30,
                "replay.auto_vacuum_enabled" if shrinks else "replay.auto_vacuum_unavailable",
                path=str(root),
                seconds=round(time.monotonic() - t0, 3),
            )
        self._last_sync = time.monotonic()
        # Run by the commit stage after each commit; shares its segment bookkeeping and counters.
        self._retention = retention.Retention(
            conn=conn,
            root=root,
            seg_dir=self._seg_dir,
            max_rows=config.retention_max_rows,
            budget=self._budget,
            shrinks=shrinks,
            rows=rows,
            store_bytes=store_bytes,
            seg_sizes=self._seg_sizes,
            unsynced=self._unsynced,
            counters=self._counters,
        )

        # WAL checkpoints (copying pages into the database file, with two fsyncs) run on their own
        # thread and connection, not inside a commit.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer = WalCheckpointer(root, self._budget.wal_bytes)
        self._threads = [
            threading.Thread(target=self._run_stage, name="replay-stage", daemon=True),
            threading.Thread(target=self._run, name="replay-writer", daemon=True),
        ]
        for t in self._threads:
            t.start()
        log.info(
            "replay.open",
            path=str(root),
            boot_epoch=self.boot_epoch,
            rows=self._retention.rows,
            segments=len(segs),
            torn_bytes=self.recovery.torn_bytes,
            rows_deleted=self.recovery.rows_deleted,
        )

    def counters(self) -> dict[str, int]:
        """Totals since open, for metrics (`openpi_rl_replay_<name>_total`)."""
        return {**self._counters, **self._checkpointer.counters}

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop accepting, commit everything queued, close files, release the directory.
        Idempotent."""
        super().close(timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the owner lock
            self._lock_fd = None

    def _close_files(self, deadline: float | None, timeout: float | None) -> None:
        self._checkpointer.close(  # after the commit stage is done
            None if deadline is None else max(0.0, deadline - time.monotonic())
        )
        if self._checkpointer.is_alive():
            raise TimeoutError(
                f"replay writer (replay-checkpoint) did not finish within {timeout} s"
            )
        self._appender.close()
        for seg in self._unsynced.values():
            seg.close()
        self._unsynced.clear()

    # ---- stage (thread replay-stage): the appends' bytes into segment files ------------------

    def _prepare(self, item: tuple) -> tuple:
        """An append's observation bytes into the segment; returns the row that points at them."""
        if item[0] != APPEND:
            return item
        head, obs, tail = encode_append(item)
        seg, off, length, crc = self._appender.append(obs)
        return (ROW, seg, (*head, seg.seg, off, length, crc, *tail))

    # ---- commit stage (thread replay-writer, the Committer's loop) ---------------------------

    def _stage(self, item: tuple, batch: Batch) -> None:
        batch.add(item)
        if item[0] == ROW:  # the segment's size as far as committed rows reach, and its sync
            _, seg, row = item
            self._seg_sizes[seg.seg] = row[8] + row[9]
            if self.config.fsync_interval_s is not None:
                self._unsynced[seg.seg] = seg

    def _commit(self, batch: Batch) -> None:
        wal = retention.wal_files_bytes(self.root)[0]
        super()._commit(batch)
        # What a commit adds to the WAL (retention keeps room for it), decaying.
        step = retention.wal_files_bytes(self.root)[0] - wal
        self._wal_step = max(step, self._wal_step * 63 // 64)
        self._retention.apply(self._wal_step, self._checkpointer)
        self._checkpointer.check(self._conn)

    def _sync_files(self) -> None:
        """fdatasync every segment the committed and staged rows point into; close the retired.
        Segment bytes are in the OS already (appended before their rows got here); on the disk
        before the WAL commit that makes their rows durable."""
        sync_segments(self._unsynced)

    def _count_committed(self, batch: Batch) -> None:
        committed = len(batch.rows) - batch.refused_rows
        self._retention.rows += committed
        self._counters["transitions_committed"] += committed
        self._counters["bytes_committed"] += batch.obs_bytes - batch.refused_bytes


def _lock_owner(root: Path) -> int:
    """Take `root/owner.lock` (flock, exclusive) for this process; ReplayLocked if held."""
    path = root / "owner.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ReplayLocked(
            f"replay directory {root} is in use by another writer (pid {holder}): one policy "
            "server per replay directory (give each server its own `replay_dir`)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
