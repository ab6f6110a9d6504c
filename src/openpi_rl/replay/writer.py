"""`ReplayWriter`: the one writer of the replay store, a two-stage pipeline of threads.

Callers (the policy server's loop, the reward bridge) get an id back at once and the row goes on
a bounded queue. The segment stage (`replay-segments`) checksums each observation and appends it
to the current segment file (unbuffered: the bytes are in the OS when the write returns), then
hands the row, now pointing at its bytes, to the commit stage (`replay-writer`), which commits
the SQLite transaction holding those rows every `commit_interval_s` (guarantee 2: a `kill -9`
loses at most the rows of one commit interval; an event passed with `wait=True` is acknowledged
only after its commit). With `fsync_interval_s`, the commit stage fdatasyncs the segments before
the commit that syncs the WAL. So a row never commits before its bytes reached the OS (and, when
syncing, the disk), while the checksum and the copy into the page cache (~60 us for 150 kB, both
GIL-free) overlap the SQLite work of earlier rows instead of adding to it. WAL checkpoints run on
a third thread (`replay-checkpoint`, `checkpoint.py`), off the commit path, and keep the WAL
within `DiskBudget.wal_bytes`; retention (`retention.py`) keeps the whole directory under
`retention_max_bytes`. The items the stages pass each other, the batch a commit gathers and the
SQL that writes it are in `pipeline.py`; this module owns the threads, the ids and the files.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from openpi_rl.replay import retention, schema
from openpi_rl.replay.checkpoint import WalCheckpointer
from openpi_rl.replay.pipeline import (
    APPEND,
    BARRIER,
    CHUNK,
    EVENT,
    ITEM_ERRORS,
    REPORT,
    ROW,
    STOP,
    Batch,
    ItemRefused,
    fail_waiters,
    new_waiter,
    take,
    wait_for,
    write_batch,
    write_isolated,
)
from openpi_rl.replay.pipeline import Credit as Credit  # re-exported: the writer's API
from openpi_rl.replay.pipeline import Resolve as Resolve
from openpi_rl.replay.pipeline import RewardEventResult as RewardEventResult
from openpi_rl.replay.recovery import RecoveryReport, recover
from openpi_rl.replay.segments import (
    HEADER_SIZE,
    SegmentWriter,
    list_segments,
    segment_path,
)

log = structlog.get_logger("openpi_rl.replay")

# id = (boot_epoch << SEQ_BITS) | seq. The epoch is committed at open, before any id is handed
# out, so ids given out but never committed before a crash are never reused. 40 bits of seq is
# ~35 years at 1000 rows/s per boot; ids stay below 2**53 (JSON-safe) for the first 8191 boots.
SEQ_BITS = 40
SEQ_MASK = (1 << SEQ_BITS) - 1


class ReplayFull(Exception):
    """The writer's queue stayed full for `enqueue_timeout_s`: the disk cannot keep up."""


class ReplayLocked(RuntimeError):
    """Another process writes this replay directory's transitions (one owner per directory)."""


class ReplayClosed(Exception):
    """The writer was closed (or its thread failed); nothing more is accepted."""


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    path: Path
    """Directory of the store (created if missing): `replay.sqlite` + `segments/`."""
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
    events_only: bool = False
    """Write reward events only (the reward bridge, alongside a live server that owns the
    transitions): no segment recovery, no segment files, no retention."""
    busy_timeout_s: float = 5.0
    """How long one commit waits for another process's write lock; past it the commit is
    rolled back and retried (counted as `commit_retries`), never dropped."""

    def create(self) -> ReplayWriter:
        return ReplayWriter(self)


class ReplayWriter:
    """Single writer of a replay directory. Thread-safe to call; `close()` flushes."""

    def __init__(self, config: ReplayConfig):
        self.config = config
        self.root = Path(config.path)
        self._seg_dir = self.root / schema.SEGMENTS_DIR
        if config.events_only:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd: int | None = None
        else:
            self._seg_dir.mkdir(parents=True, exist_ok=True)
            # Recovery truncates segment tails and ids come from this process's boot epoch: a
            # second owner would corrupt both. The lock dies with the process (kill -9 too).
            self._lock_fd = _lock_owner(self.root)
        self._budget = retention.DiskBudget.make(config.retention_max_bytes, config.wal_max_bytes)
        self._conn = schema.connect_writer(
            self.root,
            busy_timeout_s=config.busy_timeout_s,
            journal_size_limit=self._budget.wal_bytes,
        )
        # Recovery truncates segment tails: only the owner of the segments may run it.
        self.recovery: RecoveryReport = (
            RecoveryReport(None, 0, 0) if config.events_only else recover(self._conn, self._seg_dir)
        )
        self.boot_epoch = self._next_boot_epoch()
        self._id_base = self.boot_epoch << SEQ_BITS
        self._seq = 0
        self._id_lock = threading.Lock()

        segs = [] if config.events_only else list_segments(self._seg_dir)
        # Segment stage: the file being appended to, opened lazily (idle restarts add no files).
        self._seg: SegmentWriter | None = None
        self._next_seg = (segs[-1] + 1) if segs else 1
        # Commit stage: sizes of the segments as far as its rows reach (retention reads them) and,
        # with fsync, the files it still has to sync; it closes a retired one after its sync.
        self._seg_sizes = {s: segment_path(self._seg_dir, s).stat().st_size for s in segs}
        self._unsynced: dict[int, SegmentWriter] = {}
        store_bytes = sum(self._seg_sizes.values()) + retention.db_bytes(self._conn)[0]
        self._wal_step = 0  # about the most a commit adds to the WAL
        rows = self._conn.execute("SELECT count(*) FROM transitions").fetchone()[0]
        # Whether the database file can shrink after retention deletes (see retention.py).
        shrinks = schema.incremental_vacuum(self._conn)
        if not shrinks and config.retention_max_bytes is not None and not config.events_only:
            t0 = time.monotonic()
            shrinks = schema.enable_incremental_vacuum(self._conn)
            log.log(
                20 if shrinks else 30,
                "replay.auto_vacuum_enabled" if shrinks else "replay.auto_vacuum_unavailable",
                path=str(self.root),
                seconds=round(time.monotonic() - t0, 3),
            )
        self._last_sync = time.monotonic()
        self._counters = dict.fromkeys(
            (
                "transitions_committed",
                "bytes_committed",
                "commits",
                "reports_missing",
                "events_committed",
                "events_duplicate",
                "retention_rows_deleted",
                "retention_segments_deleted",
                "retention_pages_vacuumed",
                "retention_busy",
                "commit_retries",
                "items_refused",
            ),
            0,
        )
        # Run by the commit stage after each commit; shares its segment bookkeeping and counters.
        self._retention = retention.Retention(
            conn=self._conn,
            root=self.root,
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

        self._q: queue.Queue = queue.Queue(maxsize=config.max_queue)
        self._put_lock = threading.Lock()
        self._closed = False
        self._error: BaseException | None = None
        # Segment stage -> commit stage: lists of items, in caller order (a report or event never
        # overtakes the append it refers to). None in events-only mode: there are no segments.
        self._staged: queue.Queue | None = None
        self._threads = []
        if not config.events_only:
            self._staged = queue.Queue(maxsize=max(2, config.max_queue // CHUNK))
            self._threads.append(
                threading.Thread(target=self._run_segments, name="replay-segments", daemon=True)
            )
        self._threads.append(threading.Thread(target=self._run, name="replay-writer", daemon=True))
        for t in self._threads:
            t.start()
        # WAL checkpoints (copying pages into the database file, with two fsyncs) run on their own
        # thread and connection, not inside a commit. The events-only writer keeps SQLite's
        # autocheckpoint: its commits are small, and the store's owner truncates the WAL.
        self._checkpointer: WalCheckpointer | None = None
        if not config.events_only:
            self._conn.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = WalCheckpointer(self.root, self._budget.wal_bytes)
        log.info(
            "replay.open",
            path=str(self.root),
            boot_epoch=self.boot_epoch,
            rows=self._retention.rows,
            segments=len(segs),
            torn_bytes=self.recovery.torn_bytes,
            rows_deleted=self.recovery.rows_deleted,
        )

    # ---- caller side -------------------------------------------------------------------------

    def append_transition(
        self,
        robot_id: str,
        episode_id: str,
        step: int,
        policy_version: int,
        obs_bytes: bytes,
        actions: np.ndarray,
        policy_actions: np.ndarray | None,
        logp: float,
        value: float,
        t_mono: float,
        tid: int | None = None,
    ) -> int:
        """Queue one served action chunk; returns its transition id without waiting for disk.

        `obs_bytes` is the msgpack-encoded observation as received (not copied: do not mutate).
        `policy_actions` are the policy's own outputs (e.g. its action tokens) when they differ
        from `actions`. `tid`: an id taken with `new_id()` (default: a new one). Raises
        `ReplayFull` when the queue stays full, `ReplayClosed` after close.
        """
        if self.config.events_only:
            raise ValueError(f"{self.root}: events_only writer; transitions need the store's owner")
        tid = self._new_id() if tid is None else tid
        item = (
            APPEND,
            tid,
            str(robot_id),
            str(episode_id),
            int(step),
            int(policy_version),
            float(t_mono),
            time.time(),
            obs_bytes,
            schema.pack_array(np.asarray(actions)),
            schema.pack_array(None if policy_actions is None else np.asarray(policy_actions)),
            float(logp),
            float(value),
        )
        self._put(item)
        return tid

    def new_id(self) -> int:
        """A transition id to pass to `append_transition(tid=...)`: a server that sends its
        reply (which names the id) before it queues the transition takes the id first."""
        return self._new_id()

    def ensure_room(self, n: int) -> None:
        """Return once the queue has room for `n` more items; ReplayFull past
        `enqueue_timeout_s`, ReplayClosed after close. With one producing thread, the next `n`
        appends then never meet a full queue: checked before a reply, queued after it."""
        self._put(None, room=n)

    def report(
        self,
        transition_id: int,
        reward: float,
        done: bool,
        truncated: bool,
        executed_actions: np.ndarray | None = None,
        intervened: bool = False,
        robot_id: str | None = None,
    ) -> concurrent.futures.Future:
        """Queue an environment report for a transition: rewards are summed into it; done,
        truncated and intervened are set (never cleared); executed actions (teleop) replace.
        With `robot_id`, it applies only if the transition is that robot's. The future gives
        True once committed, False if no such transition (of that robot) is stored, or
        `ItemRefused`; acknowledge the robot after it. ValueError for an id or reward the store
        cannot hold (checked here, before anything is queued)."""
        tid = int(transition_id)
        if not 0 < tid < 2**63:
            raise ValueError(f"transition_id: expected an int in (0, 2**63), got {tid}")
        if not np.isfinite(reward):
            raise ValueError(f"reward: expected a finite float, got {reward}")
        executed = None if executed_actions is None else np.asarray(executed_actions)
        fut = new_waiter()
        item = (REPORT, float(reward), int(bool(done)), int(bool(truncated)))
        item += (int(bool(intervened)), schema.pack_array(executed), tid)
        self._put((*item, None if robot_id is None else str(robot_id), fut))
        return fut

    def add_reward_event(
        self,
        robot_id: str,
        kind: str,
        value: float,
        operator: str | None = None,
        t: float | None = None,
        idempotency_key: str | None = None,
        transition_id: int | None = None,
        wait: bool = False,
        timeout: float | None = 5.0,
    ) -> int:
        """Queue a human feedback event. With `wait=True`, return only once it is committed
        (acknowledge to the pendant after this); if `idempotency_key` was stored before, nothing
        is inserted and the stored event's id is returned."""
        fut = self.submit_reward_event(
            robot_id, kind, value, operator, t, idempotency_key, transition_id
        )
        return wait_for(fut, timeout).id if wait else fut.event_id  # type: ignore[attr-defined]

    def submit_reward_event(
        self,
        robot_id: str,
        kind: str,
        value: float,
        operator: str | None = None,
        t: float | None = None,
        idempotency_key: str | None = None,
        transition_id: int | None = None,
        *,
        episode_id: str | None = None,
        status: str | None = None,
        client_time: float | None = None,
        resolve: Resolve | None = None,
    ) -> concurrent.futures.Future:
        """Queue a reward event; the future gives its `RewardEventResult` once committed (async
        callers: `asyncio.wrap_future`). `resolve(conn)`, if given, runs inside the commit's write
        transaction, so it sees every committed transition and no other writer can change them
        before the event lands: it returns (transition_id, episode_id, status, close_episode),
        replacing the given fields; close_episode sets `episodes.ended`. It is not run for a
        duplicate; if it raises, the event is stored unattached with the error as status."""
        eid = self._new_id()
        fut = new_waiter()
        fut.event_id = eid  # type: ignore[attr-defined]
        item = (EVENT, eid, str(robot_id), str(kind), float(value), operator)
        item += (time.time() if t is None else float(t), time.time(), idempotency_key)
        item += (transition_id, episode_id, status, client_time, resolve, fut)
        self._put(item)
        return fut

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until everything queued before this call is committed."""
        fut = new_waiter()
        self._put((BARRIER, fut), timeout=timeout)
        wait_for(fut, timeout)

    @property
    def error(self) -> BaseException | None:
        """Why a stage of the writer failed (it accepts nothing more); None while it works."""
        return self._error

    def queue_depth(self) -> int:
        """Items handed to the writer and not yet taken into a commit."""
        staged = 0 if self._staged is None else sum(map(len, list(self._staged.queue)))
        return self._q.qsize() + staged

    def counters(self) -> dict[str, int]:
        """Totals since open, for metrics (`openpi_rl_replay_<name>_total`)."""
        extra = {} if self._checkpointer is None else self._checkpointer.counters
        return {**self._counters, **extra}

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop accepting, commit everything queued, close files. Idempotent."""
        with self._put_lock:
            if self._closed:
                already = True
            else:
                already, self._closed = False, True
        if not already and self._threads[0].is_alive():
            self._q.put((STOP,))
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise TimeoutError(f"replay writer ({t.name}) did not finish within {timeout} s")
        if self._checkpointer is not None:  # after the commit stage is done
            self._checkpointer.close(
                None if deadline is None else max(0.0, deadline - time.monotonic())
            )
            if self._checkpointer.is_alive():
                raise TimeoutError(
                    f"replay writer (replay-checkpoint) did not finish within {timeout} s"
                )
        for seg in (self._seg, *self._unsynced.values()):
            if seg is not None:
                seg.close()
        self._seg = None
        self._unsynced.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None  # type: ignore[assignment]
            log.info("replay.close", path=str(self.root), **self._counters)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the owner lock
            self._lock_fd = None

    def __enter__(self) -> ReplayWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _new_id(self) -> int:
        with self._id_lock:
            self._seq += 1
            if self._seq > SEQ_MASK:
                raise OverflowError("replay ids of this boot epoch exhausted; reopen the writer")
            return self._id_base | self._seq

    def _put(self, item: tuple | None, timeout: float | None = None, room: int = 1) -> None:
        """Queue `item` once there is room for `room` items (None: only wait for the room).
        The closed check and the put happen under one lock so that nothing lands on the queue
        after close()'s stop marker; a full queue is waited on outside the lock."""
        timeout = self.config.enqueue_timeout_s if timeout is None else timeout
        deadline = None
        while True:
            with self._put_lock:
                if self._closed:
                    cause = f": writer failed: {self._error!r}" if self._error else ""
                    raise ReplayClosed(f"replay writer for {self.root} is closed{cause}")
                if self._q.qsize() + room <= self.config.max_queue:
                    if item is not None:  # cannot fail: only this lock's holder adds
                        self._q.put_nowait(item)
                    return
            now = time.monotonic()
            deadline = deadline or now + timeout
            if now >= deadline:
                raise ReplayFull(
                    f"replay queue: expected room for {room} within {timeout} s, "
                    f"got {self.config.max_queue} items still queued"
                )
            time.sleep(0.001)

    def _next_boot_epoch(self) -> int:
        conn = self._conn
        conn.execute("PRAGMA synchronous=FULL")  # this one commit must outlive power loss too
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT value FROM meta WHERE key = 'boot_epoch'").fetchone()
        epoch = (int(row[0]) if row else 0) + 1
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('boot_epoch', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(epoch),),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA synchronous=NORMAL")
        return epoch

    def _fail(self, exc: BaseException) -> ReplayClosed:
        with self._put_lock:
            self._error = self._error or exc
            self._closed = True
        # Wake the first stage if it waits for work (a full queue: it is busy, and sees the
        # failure before its next wait).
        with contextlib.suppress(queue.Full):
            self._q.put_nowait((STOP,))
        return ReplayClosed(f"replay writer failed: {exc!r}")

    # ---- segment stage (thread replay-segments) ----------------------------------------------

    def _run_segments(self) -> None:
        """Take the callers' items in chunks, write the appends' bytes, pass everything on in
        order to the commit stage; end by passing a stop marker on."""
        staged = self._staged
        assert staged is not None
        items: list[tuple] = []
        out: list[tuple] = []
        try:
            while True:
                items = take(self._q, None)
                if self._error is not None:  # the commit stage failed: stop writing bytes
                    break
                out = []  # filled item by item: on a failure it holds what was written
                for item in items:
                    out.append(self._write_segment(item))
                staged.put(out)
                out = []
                if items[-1][0] == STOP:
                    return
        except BaseException as exc:
            log.exception("replay.segments_failed", path=str(self.root))
            self._fail(exc)
            staged.put(out)  # what was written before the failure still commits
            items = items[len(out) :]
        # Failed (here or in the commit stage), so nothing more is accepted (`_put` checks under
        # the lock `_fail` took): fail whoever still waits in the queue.
        failed = ReplayClosed(f"replay writer failed: {self._error!r}")
        while items:
            fail_waiters(items, failed)
            items = take(self._q, 0)
        staged.put([(STOP,)])

    def _write_segment(self, item: tuple) -> tuple:
        """An append's observation bytes into the segment; returns the row that points at them."""
        if item[0] != APPEND:
            return item
        (_, tid, robot, ep, step, ver, t_mono, t_wall, obs, act, pact, logp, value) = item
        seg = self._segment_for(len(obs))
        off, length, crc = seg.append(obs)
        if self.config.fsync_interval_s is not None:
            seg.start_writeback()
        row = (tid, robot, ep, step, ver, t_mono, t_wall, seg.seg, off, length, crc)
        return (ROW, seg, (*row, act, pact, logp, value))

    def _segment_for(self, payload_len: int) -> SegmentWriter:
        seg = self._seg
        full = (
            seg is not None and seg.size + HEADER_SIZE + payload_len > self.config.segment_max_bytes
        )
        if seg is not None and seg.size > 0 and full:
            # Without fsync nothing is pending: each append's bytes are in the OS on return. With
            # it, the commit stage syncs the retired file before the commit that needs it, then
            # closes it.
            if self.config.fsync_interval_s is None:
                seg.close()
            seg = None
        if seg is None:
            seg = self._seg = SegmentWriter(self._seg_dir, self._next_seg)
            self._next_seg += 1
        return seg

    # ---- commit stage (thread replay-writer) -------------------------------------------------

    def _run(self) -> None:
        batch = Batch()
        deadline: float | None = None  # commit by then: commit_interval after the batch began
        stop = False
        try:
            while not stop:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                if self._staged is None:
                    items = take(self._q, timeout)
                else:  # a chunk as the segment stage took it (at most CHUNK items)
                    try:
                        items = self._staged.get(timeout=timeout)
                    except queue.Empty:
                        items = []
                for item in items:
                    if item[0] == STOP:
                        stop = True
                    else:
                        self._stage(item, batch)
                if batch and deadline is None:
                    deadline = time.monotonic() + self.config.commit_interval_s
                urgent = bool(batch.waiters) or stop
                if batch and (urgent or time.monotonic() >= deadline):  # type: ignore[operator]
                    wal = retention.wal_files_bytes(self.root)[0]
                    self._commit(batch)
                    # What a commit adds to the WAL (retention keeps room for it), decaying.
                    step = retention.wal_files_bytes(self.root)[0] - wal
                    self._wal_step = max(step, self._wal_step * 63 // 64)
                    batch, deadline = Batch(), None
                    if not self.config.events_only:
                        self._retention.apply(self._wal_step, self._checkpointer)
                    if self._checkpointer is not None:
                        self._checkpointer.check(self._conn)
        except BaseException as exc:
            log.exception("replay.writer_failed", path=str(self.root))
            failed = self._fail(exc)
            fail_waiters([(BARRIER, w) for w in batch.waiters], failed)
            if self._staged is None:
                while True:  # fail whoever still waits on a commit
                    try:
                        fail_waiters([self._q.get_nowait()], failed)
                    except queue.Empty:
                        break
                return
            while not stop:  # until the segment stage stops: it may hold more waiters
                items = self._staged.get()
                fail_waiters(items, failed)
                stop = any(item[0] == STOP for item in items)

    def _stage(self, item: tuple, batch: Batch) -> None:
        batch.add(item)
        if item[0] == ROW:  # the segment's size as far as committed rows reach, and its sync
            _, seg, row = item
            self._seg_sizes[seg.seg] = row[8] + row[9]
            if self.config.fsync_interval_s is not None:
                self._unsynced[seg.seg] = seg

    def _sync_segments(self) -> None:
        """fdatasync every segment the committed and staged rows point into; close the retired."""
        newest = max(self._unsynced, default=None)
        for seg_id in list(self._unsynced):
            self._unsynced[seg_id].sync()
            if seg_id != newest:  # the segment stage moved on: nothing more is written to it
                self._unsynced.pop(seg_id).close()

    def _commit(self, batch: Batch) -> None:
        # Another process (server or bridge) may hold the write lock past busy_timeout: roll
        # back and retry the same batch; the rows and waiters stay with us, nothing is dropped.
        # An error that is one item's (a value SQLite cannot hold, a constraint) writes the
        # batch again item by item: the bad one is refused and counted, the others commit.
        # A store's error (disk full, I/O, corruption) fails the writer: health says so.
        pause = 0.01
        isolate = False
        while True:
            try:
                return self._commit_once(batch, isolate)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                self._counters["commit_retries"] += 1
                log.warning("replay.commit_busy_retry", path=str(self.root), error=str(e))
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
            except ITEM_ERRORS as e:
                if isolate:
                    raise
                log.warning("replay.commit_isolating_items", error=f"{e!r:.300}")
                isolate = True

    def _commit_once(self, batch: Batch, isolate: bool = False) -> None:
        conn = self._conn
        fsync = self.config.fsync_interval_s
        now = time.monotonic()
        sync_due = fsync is not None and now - self._last_sync >= fsync
        if sync_due:
            # Segment bytes are in the OS already (appended before their rows got here); on the
            # disk before the WAL commit that makes their rows durable.
            self._sync_segments()
            conn.execute("PRAGMA synchronous=FULL")  # WAL mode: the WAL is synced on commit
        # IMMEDIATE: take the write lock first (waiting busy_timeout), so reads made by an
        # event's `resolve` cannot go stale before the write (SQLITE_BUSY_SNAPSHOT).
        conn.execute("BEGIN IMMEDIATE")
        try:
            write = write_isolated if isolate else write_batch
            results, found = write(conn, batch, self._counters)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if sync_due:
            conn.execute("PRAGMA synchronous=NORMAL")
            self._last_sync = now
        committed = len(batch.rows) - batch.refused_rows
        self._retention.rows += committed
        self._counters["transitions_committed"] += committed
        self._counters["bytes_committed"] += batch.obs_bytes - batch.refused_bytes
        self._counters["commits"] += 1
        stored = [r for r in results if not isinstance(r, ItemRefused)]
        dups = sum(r.duplicate for r in stored)
        self._counters["events_duplicate"] += dups
        self._counters["events_committed"] += len(stored) - dups
        for item, result in zip([*batch.events, *batch.reports], [*results, *found], strict=True):
            if isinstance(result, ItemRefused):
                item[-1].set_exception(result)
            else:
                item[-1].set_result(result)
        for w in batch.waiters:
            if not w.done():
                w.set_result(None)


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
