"""The replay's writers on PostgreSQL: `PgReplayWriter` (a policy server's) and `PgEventsWriter`
(a reward bridge's), chosen by `ReplayConfig.create()` / `ReplayEventsConfig.create()` when the
location is a `postgresql://` URL.

They keep the SQLite writers' caller side, stages and guarantees (`committer.py`,
`transitions.py`): the reply never waits for the database; an item is stored once its batch
commits; an event passed with `wait=True` is acknowledged only after that. What differs:
- Observation records go, on the stage, into this writer's own segment files beside the database
  (`observations_dir`; a new directory per boot, so no recovery and no owner lock), or into the
  `observations` table in the same transaction as their rows. Any number of writers share the
  database: each has its own boot epoch, so ids never collide.
- The database may go away (restarted, unreachable). The commit stage then keeps its batch,
  reconnects with backoff (counted: `db_reconnects`) and commits it again; meanwhile the bounded
  queue fills and callers get `ReplayFull` (the server answers robots `overloaded`), so memory
  stays bounded and nothing handed over is dropped. Whether a batch whose COMMIT was cut off
  landed is read from this writer's marker in `commits`, written in every batch's transaction:
  a report adds to a reward, so committing such a batch twice would count it twice.
- Retention (`retention_max_rows`, `retention_max_bytes` = stored observation bytes) runs at
  most once a second after a commit (`pg_retention.py`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from openpi_rl.replay import postgres
from openpi_rl.replay.committer import COUNTERS, Committer
from openpi_rl.replay.pg_retention import apply_retention
from openpi_rl.replay.pipeline import (
    APPEND,
    ROW,
    Batch,
    ItemRefused,
    RewardEventResult,
    encode_append,
    write_batch,
    write_isolated,
)
from openpi_rl.replay.segments import (
    SegmentAppender,
    SegmentWriter,
    crc32,
    sync_segments,
)
from openpi_rl.replay.transitions import TransitionsCommitter

log = structlog.get_logger("openpi_rl.replay")

PG_COUNTERS = ("db_reconnects", "db_errors")
RECONNECT_MAX_PAUSE_S = 2.0
RETENTION_EVERY_S = 1.0


def item_errors() -> tuple[type[BaseException], ...]:
    """psycopg's errors that belong to one item (a value PostgreSQL cannot hold, a constraint);
    the rest of a batch commits without it (`write_isolated`)."""
    import psycopg

    return (
        psycopg.errors.IntegrityError,
        psycopg.errors.DataError,
        OverflowError,
        ValueError,
        TypeError,
    )


class PgCommits:
    """The commit stage on PostgreSQL, for a `Committer` subclass: reconnects, commit markers."""

    _conn: Any
    _counters: dict[str, int]
    root: Any
    boot_epoch: int

    def _open(self, url: str, timeout_s: float) -> postgres.Connection:
        self._url = url
        self._connect_timeout_s = timeout_s
        self._batch_seq = 0
        self._item_errors = item_errors()
        return postgres.connect_writer(url, timeout_s)

    def _next_boot_epoch(self) -> int:
        return postgres.next_boot_epoch(self._conn)

    def _commit(self, batch: Batch) -> None:
        import psycopg

        self._batch_seq += 1
        seq = self._batch_seq
        pause = 0.05
        isolate = False
        uncertain = False  # a connection was lost while this batch was being written
        while True:
            try:
                if self._conn is None:
                    self._conn = postgres.connect(self._url, self._connect_timeout_s)
                    self._connected()
                    self._counters["db_reconnects"] += 1
                    log.info("replay.db_reconnected", url=postgres.describe(self._url))
                if uncertain and self._landed(seq):
                    self._committed(batch, *self._results(batch))
                else:
                    self._write(batch, seq, isolate)
                break
            except psycopg.OperationalError as e:  # the server went away, or the network
                uncertain = True
                self._counters["db_errors"] += 1
                log.warning(
                    "replay.db_unavailable", url=postgres.describe(self._url),
                    error=f"{e!r:.300}", retry_in_s=pause, queued=self.queue_depth(),
                )  # fmt: skip
                self._drop()
                time.sleep(pause)
                pause = min(pause * 2, RECONNECT_MAX_PAUSE_S)
            except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected) as e:
                self._counters["commit_retries"] += 1
                log.warning("replay.commit_conflict_retry", error=f"{e!r:.200}")
                time.sleep(0.01)
            except self._item_errors as e:
                if isolate:
                    raise
                log.warning("replay.commit_isolating_items", error=f"{e!r:.300}")
                isolate = True
        try:  # upkeep after the commit: a failure here must not commit the batch again
            self._after_commit(seq)
        except psycopg.Error as e:
            self._counters["db_errors"] += 1
            log.warning("replay.upkeep_failed", error=f"{e!r:.300}")
            if isinstance(e, psycopg.OperationalError):
                self._drop()

    def _write(self, batch: Batch, seq: int, isolate: bool) -> None:
        conn = self._conn
        self._sync_files()
        conn.execute("BEGIN")
        try:
            if isolate:
                results, found = write_isolated(conn, batch, self._counters, self._item_errors)
            else:
                results, found = write_batch(conn, batch, self._counters)
            conn.execute(
                "INSERT INTO commits (writer, batch, t_wall) VALUES (?, ?, ?)"
                " ON CONFLICT (writer, batch) DO NOTHING",
                (self.boot_epoch, seq, time.time()),
            )
            conn.execute("COMMIT")
        except BaseException:
            if not conn.closed and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._committed(batch, results, found)

    def _landed(self, seq: int) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM commits WHERE writer = ? AND batch = ?", (self.boot_epoch, seq)
        ).fetchone()
        if row is not None:
            log.info("replay.commit_found_after_reconnect", batch=seq)
        return row is not None

    def _results(self, batch: Batch) -> tuple[list, list]:
        """A batch that committed before its connection was lost: its events as stored and
        whether each report found its transition, read back."""
        q = self._conn.execute
        results: list[RewardEventResult | ItemRefused] = []
        for ev in batch.events:
            eid, key = ev[0], ev[6]
            row = q(
                "SELECT id, transition_id, episode_id, status FROM reward_events WHERE id = ?"
                " OR (CAST(? AS TEXT) IS NOT NULL AND idempotency_key = ?)",
                (eid, key, key),
            ).fetchone()
            results.append(RewardEventResult(*row, duplicate=row[0] != eid))
        found = []
        for r in batch.reports:
            tid, robot = r[5], r[6]
            hit = q(
                "SELECT 1 FROM transitions WHERE id = ? AND (CAST(? AS TEXT) IS NULL OR robot_id = ?)",
                (tid, robot, robot),
            ).fetchone()
            found.append(hit is not None)
        return results, found

    def _after_commit(self, seq: int) -> None:
        # One marker is enough to look for (one batch is in flight at a time): drop the older.
        if seq % 64 == 0:
            self._conn.execute(
                "DELETE FROM commits WHERE writer = ? AND batch < ?", (self.boot_epoch, seq)
            )

    def _connected(self) -> None:
        """On a new connection after a lost one: what the writer's session holds."""

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # already broken
                self._conn.close()
            self._conn = None

    def _sync_files(self) -> None:
        """Before a commit: sync what its rows point at outside the database (the database's
        own durability is the server's `synchronous_commit`)."""


class PgReplayWriter(PgCommits, TransitionsCommitter):
    """A policy server's writer of transitions, reports and events into a PostgreSQL replay.
    Thread-safe to call; `close()` flushes. Built by `ReplayConfig.create()`."""

    # The stage runs ahead of one commit, no more: while the database is away, what the writer
    # holds stays about `max_queue` (with the records in the table, that is their bytes).
    STAGED_CHUNKS = 2

    def __init__(self, config: Any):
        url = str(config.path)
        conn = self._open(url, config.busy_timeout_s)
        counters = (
            *("transitions_committed", "bytes_committed", "reports_missing", *COUNTERS),
            *("retention_rows_deleted", "retention_segments_deleted", *PG_COUNTERS),
        )
        super().__init__(config, url, conn, counters, where=postgres.describe(url))
        self.recovery = None  # nothing to recover: a torn tail is bytes no committed row points at
        self._last_retention = 0.0
        # Observation records in this writer's own segment files (appended by the stage), or in
        # the observations table (in the rows' transaction).
        self._segments: WriterSegments | None = None
        syncing = config.fsync_interval_s is not None
        if config.observations_dir is not None:
            self._segments = WriterSegments(
                Path(config.observations_dir), self.boot_epoch, config.segment_max_bytes, syncing
            )
            self._segments.register(conn)
        # Commit stage: the newest segment its rows point into (retention keeps it and later
        # ones: the stage appends there) and, with fsync, the files it still has to sync.
        self._last_seg = 1
        self._unsynced: dict[int, SegmentWriter] = {}
        self._threads = [
            threading.Thread(target=self._run_stage, name="replay-stage", daemon=True),
            threading.Thread(target=self._run, name="replay-writer", daemon=True),
        ]
        for t in self._threads:
            t.start()
        log.info("replay.open", path=self.where, boot_epoch=self.boot_epoch)

    def _prepare(self, item: tuple) -> tuple:
        """On the stage: an append's observation record into this writer's segment file (in the
        OS before its row commits), or kept with its row for the observations table."""
        if item[0] != APPEND:
            return item
        head, obs, tail = encode_append(item)
        if self._segments is None:
            return (ROW, obs, (*head, 0, 0, len(obs), crc32(obs), *tail))
        seg, off, length, crc = self._segments.append(obs)
        return (ROW, seg, (*head, seg.seg, off, length, crc, *tail))

    def _stage(self, item: tuple, batch: Batch) -> None:
        batch.add(item)
        if item[0] != ROW:
            return
        _, held, row = item
        if self._segments is None:  # the record goes in the row's transaction
            batch.observations.append((row[0], held))
            return
        self._last_seg = row[7]
        if self.config.fsync_interval_s is not None:
            self._unsynced[row[7]] = held

    def _connected(self) -> None:
        if self._segments is not None:
            self._segments.register(self._conn)

    def _sync_files(self) -> None:
        if self._unsynced and self.config.fsync_interval_s is not None:
            now = time.monotonic()
            if now - self._last_sync >= self.config.fsync_interval_s:
                sync_segments(self._unsynced)
                self._last_sync = now

    def _close_files(self, deadline: float | None, timeout: float | None) -> None:
        for seg in self._unsynced.values():
            seg.close()
        self._unsynced.clear()
        if self._segments is not None:
            self._segments.close()

    def _count_committed(self, batch: Batch) -> None:
        committed = len(batch.rows) - batch.refused_rows
        self._counters["transitions_committed"] += committed
        self._counters["bytes_committed"] += batch.obs_bytes - batch.refused_bytes

    def _after_commit(self, seq: int) -> None:
        super()._after_commit(seq)
        c = self.config
        now = time.monotonic()
        if c.retention_max_rows is None and c.retention_max_bytes is None:
            return
        if now - self._last_retention < RETENTION_EVERY_S:
            return
        self._last_retention = now
        current = None if self._segments is None else (self.boot_epoch, self._last_seg)
        deleted, files = apply_retention(
            self._conn, c.retention_max_rows, c.retention_max_bytes, current
        )
        self._counters["retention_rows_deleted"] += deleted
        self._counters["retention_segments_deleted"] += files


class PgEventsWriter(PgCommits, Committer):
    """A reward bridge's writer of events into a PostgreSQL replay. Built by
    `ReplayEventsConfig.create()`."""

    def __init__(self, config: Any):
        url = str(config.path)
        conn = self._open(url, config.busy_timeout_s)
        super().__init__(config, url, conn, (*COUNTERS, *PG_COUNTERS), postgres.describe(url))
        self._threads = [threading.Thread(target=self._run, name="replay-writer", daemon=True)]
        self._threads[0].start()
        log.info("replay.open", path=self.where, boot_epoch=self.boot_epoch, events_only=True)


class WriterSegments(SegmentAppender):
    """A PostgreSQL writer's observation records in append-only segment files of its own,
    `<observations_dir>/writer-<boot epoch>/` (`segments.py`'s format; no other writer appends
    there, and a new boot is a new directory, so no recovery is needed: a torn tail is bytes no
    committed row points at). Appended to by the writer's stage."""

    def __init__(self, root: Path, epoch: int, max_bytes: int, syncing: bool = False):
        self.epoch = epoch
        self.dir = root.absolute() / f"writer-{epoch}"
        self.dir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.dir, 1, max_bytes, syncing)

    def register(self, conn: postgres.Connection) -> None:
        """Name the directory in `meta` (readers find records by the epoch in a row's id) and
        hold this writer's lock on the session (retention: a writer that holds it is alive)."""
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (f"{postgres.OBS_DIR_KEY}{self.epoch}", str(self.dir)),
        )
        conn.execute("SELECT pg_advisory_lock(?, ?)", (postgres.LOCK_WRITERS, self.epoch))
