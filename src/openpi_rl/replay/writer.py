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
`retention_max_bytes`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import structlog

from openpi_rl.replay import retention, schema
from openpi_rl.replay.checkpoint import WalCheckpointer
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

_APPEND, _REPORT, _EVENT, _BARRIER, _STOP, _ROW = range(6)
_CHUNK = 64  # items a stage takes from its queue at once
_RETENTION_ROUNDS = 64  # bounded delete-and-measure rounds per commit (the next one goes on)


class ReplayFull(Exception):
    """The writer's queue stayed full for `enqueue_timeout_s`: the disk cannot keep up."""


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


class RewardEventResult(NamedTuple):
    """A committed reward event as stored (`duplicate`: its idempotency key was stored before,
    and these are the first event's fields)."""

    id: int
    transition_id: int | None
    episode_id: str | None
    status: str | None
    duplicate: bool


Credit = tuple[int | None, str | None, str | None, bool]
"""(transition_id, episode_id, status, close_episode), from a `resolve` callable."""
Resolve = Callable[[sqlite3.Connection], Credit]


def _waiter() -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_running_or_notify_cancel()  # a caller's cancel() can no longer break the writer
    return fut


def _take(q: queue.Queue, timeout: float | None) -> list[tuple]:
    """The next item and what else is waiting, up to _CHUNK (so deadlines are checked often);
    [] if nothing came within `timeout`."""
    try:
        items = [q.get(timeout=timeout)]
    except queue.Empty:
        return []
    while len(items) < _CHUNK and items[-1][0] != _STOP:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    return items


def _fail_waiters(items: list[tuple], error: BaseException) -> None:
    for item in items:
        fut = item[1] if item[0] == _BARRIER else item[-1] if item[0] == _EVENT else None
        if fut is not None and not fut.done():
            fut.set_exception(error)


def _wait(fut: concurrent.futures.Future, timeout: float | None) -> Any:
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"replay commit not done after {timeout} s") from None


@dataclasses.dataclass
class _Batch:
    rows: list[tuple] = dataclasses.field(default_factory=list)
    episodes: dict[tuple[str, str], list[int]] = dataclasses.field(default_factory=dict)
    reports: list[tuple] = dataclasses.field(default_factory=list)
    events: list[tuple] = dataclasses.field(default_factory=list)
    waiters: list[concurrent.futures.Future] = dataclasses.field(default_factory=list)
    obs_bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.rows or self.reports or self.events or self.waiters)


class ReplayWriter:
    """Single writer of a replay directory. Thread-safe to call; `close()` flushes."""

    def __init__(self, config: ReplayConfig):
        self.config = config
        self.root = Path(config.path)
        self._seg_dir = self.root / schema.SEGMENTS_DIR
        if config.events_only:
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            self._seg_dir.mkdir(parents=True, exist_ok=True)
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
        # Segments + database pages in use after the last retention (the next one predicts a
        # commit's growth from it).
        self._store_bytes = sum(self._seg_sizes.values()) + retention.db_bytes(self._conn)[0]
        self._wal_step = 0  # about the most a commit adds to the WAL
        self._rows = self._conn.execute("SELECT count(*) FROM transitions").fetchone()[0]
        # Whether the database file can shrink after retention deletes (see retention.py).
        self._shrinks = schema.incremental_vacuum(self._conn)
        if not self._shrinks and config.retention_max_bytes is not None and not config.events_only:
            t0 = time.monotonic()
            self._shrinks = schema.enable_incremental_vacuum(self._conn)
            log.log(
                20 if self._shrinks else 30,
                "replay.auto_vacuum_enabled" if self._shrinks else "replay.auto_vacuum_unavailable",
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
            ),
            0,
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
            self._staged = queue.Queue(maxsize=max(2, config.max_queue // _CHUNK))
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
            rows=self._rows,
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
            _APPEND,
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
        deadline = None
        while True:
            with self._put_lock:
                if self._closed:
                    cause = f": writer failed: {self._error!r}" if self._error else ""
                    raise ReplayClosed(f"replay writer for {self.root} is closed{cause}")
                if self._q.qsize() + n <= self.config.max_queue:
                    return
            now = time.monotonic()
            deadline = deadline or now + self.config.enqueue_timeout_s
            if now >= deadline:
                raise ReplayFull(
                    f"replay queue: expected room for {n} within {self.config.enqueue_timeout_s}"
                    f" s, got {self.config.max_queue} items still queued"
                )
            time.sleep(0.001)

    def report(
        self,
        transition_id: int,
        reward: float,
        done: bool,
        truncated: bool,
        executed_actions: np.ndarray | None = None,
        intervened: bool = False,
    ) -> None:
        """Queue an environment report for a transition: rewards are summed into it; done,
        truncated and intervened are set (never cleared); executed actions (teleop) replace."""
        executed = None if executed_actions is None else np.asarray(executed_actions)
        self._put(
            (
                _REPORT,
                float(reward),
                int(bool(done)),
                int(bool(truncated)),
                int(bool(intervened)),
                schema.pack_array(executed),
                int(transition_id),
            )
        )

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
        return _wait(fut, timeout).id if wait else fut.event_id  # type: ignore[attr-defined]

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
        fut = _waiter()
        fut.event_id = eid  # type: ignore[attr-defined]
        item = (_EVENT, eid, str(robot_id), str(kind), float(value), operator)
        item += (time.time() if t is None else float(t), time.time(), idempotency_key)
        item += (transition_id, episode_id, status, client_time, resolve, fut)
        self._put(item)
        return fut

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until everything queued before this call is committed."""
        fut = _waiter()
        self._put((_BARRIER, fut), timeout=timeout)
        _wait(fut, timeout)

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
            self._q.put((_STOP,))
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

    def _put(self, item: tuple, timeout: float | None = None) -> None:
        # The closed check and the put happen under one lock so that nothing lands on the queue
        # after close()'s stop marker; a full queue is waited on outside the lock.
        timeout = self.config.enqueue_timeout_s if timeout is None else timeout
        deadline = None
        while True:
            with self._put_lock:
                if self._closed:
                    cause = f": writer failed: {self._error!r}" if self._error else ""
                    raise ReplayClosed(f"replay writer for {self.root} is closed{cause}")
                try:
                    self._q.put_nowait(item)
                    return
                except queue.Full:
                    pass
            now = time.monotonic()
            deadline = deadline or now + timeout
            if now >= deadline:
                raise ReplayFull(
                    f"replay queue: expected room within {timeout} s, "
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
            self._q.put_nowait((_STOP,))
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
                items = _take(self._q, None)
                if self._error is not None:  # the commit stage failed: stop writing bytes
                    break
                out = []  # filled item by item: on a failure it holds what was written
                for item in items:
                    out.append(self._write_segment(item))
                staged.put(out)
                out = []
                if items[-1][0] == _STOP:
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
            _fail_waiters(items, failed)
            items = _take(self._q, 0)
        staged.put([(_STOP,)])

    def _write_segment(self, item: tuple) -> tuple:
        """An append's observation bytes into the segment; returns the row that points at them."""
        if item[0] != _APPEND:
            return item
        (_, tid, robot, ep, step, ver, t_mono, t_wall, obs, act, pact, logp, value) = item
        seg = self._segment_for(len(obs))
        off, length, crc = seg.append(obs)
        if self.config.fsync_interval_s is not None:
            seg.start_writeback()
        row = (tid, robot, ep, step, ver, t_mono, t_wall, seg.seg, off, length, crc)
        return (_ROW, seg, (*row, act, pact, logp, value))

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
        batch = _Batch()
        deadline: float | None = None  # commit by then: commit_interval after the batch began
        stop = False
        try:
            while not stop:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                if self._staged is None:
                    items = _take(self._q, timeout)
                else:  # a chunk as the segment stage took it (at most _CHUNK items)
                    try:
                        items = self._staged.get(timeout=timeout)
                    except queue.Empty:
                        items = []
                for item in items:
                    if item[0] == _STOP:
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
                    batch, deadline = _Batch(), None
                    if not self.config.events_only:
                        self._apply_retention()
                    if self._checkpointer is not None:
                        self._checkpointer.check(self._conn)
        except BaseException as exc:
            log.exception("replay.writer_failed", path=str(self.root))
            failed = self._fail(exc)
            _fail_waiters([(_BARRIER, w) for w in batch.waiters], failed)
            if self._staged is None:
                while True:  # fail whoever still waits on a commit
                    try:
                        _fail_waiters([self._q.get_nowait()], failed)
                    except queue.Empty:
                        break
                return
            while not stop:  # until the segment stage stops: it may hold more waiters
                items = self._staged.get()
                _fail_waiters(items, failed)
                stop = any(item[0] == _STOP for item in items)

    def _stage(self, item: tuple, batch: _Batch) -> None:
        kind = item[0]
        if kind == _ROW:
            _, seg, row = item
            tid, robot, ep, off, length = row[0], row[1], row[2], row[8], row[9]
            batch.rows.append(row)
            batch.obs_bytes += length
            self._seg_sizes[seg.seg] = off + length
            if self.config.fsync_interval_s is not None:
                self._unsynced[seg.seg] = seg
            agg = batch.episodes.get((robot, ep))
            if agg is None:
                batch.episodes[(robot, ep)] = [tid, tid, 1]
            else:
                agg[0], agg[1], agg[2] = min(agg[0], tid), max(agg[1], tid), agg[2] + 1
        elif kind == _REPORT:
            batch.reports.append(item[1:])
        elif kind == _EVENT:
            batch.events.append(item[1:])
            batch.waiters.append(item[-1])
        elif kind == _BARRIER:
            batch.waiters.append(item[1])

    def _sync_segments(self) -> None:
        """fdatasync every segment the committed and staged rows point into; close the retired."""
        newest = max(self._unsynced, default=None)
        for seg_id in list(self._unsynced):
            self._unsynced[seg_id].sync()
            if seg_id != newest:  # the segment stage moved on: nothing more is written to it
                self._unsynced.pop(seg_id).close()

    def _commit(self, batch: _Batch) -> None:
        # Another process (server or bridge) may hold the write lock past busy_timeout: roll
        # back and retry the same batch; the rows and waiters stay with us, nothing is dropped.
        pause = 0.01
        while True:
            try:
                return self._commit_once(batch)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                self._counters["commit_retries"] += 1
                log.warning("replay.commit_busy_retry", path=str(self.root), error=str(e))
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    def _commit_once(self, batch: _Batch) -> None:
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
            conn.executemany(
                "INSERT INTO transitions (id, robot_id, episode_id, step, policy_version, t_mono,"
                " t_wall, seg, off, len, crc, actions, policy_actions, logp, value)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                batch.rows,
            )
            conn.executemany(
                "INSERT INTO episodes (robot_id, episode_id, first_transition, last_transition,"
                " steps) VALUES (?, ?, ?, ?, ?) ON CONFLICT (robot_id, episode_id) DO UPDATE SET"
                " first_transition = min(first_transition, excluded.first_transition),"
                " last_transition = max(last_transition, excluded.last_transition),"
                " steps = steps + excluded.steps",
                [(r, e, *agg) for (r, e), agg in batch.episodes.items()],
            )
            if batch.reports:
                cur = conn.executemany(
                    "UPDATE transitions SET reward = reward + ?, done = max(done, ?),"
                    " truncated = max(truncated, ?), intervened = max(intervened, ?),"
                    " executed_actions = coalesce(?, executed_actions) WHERE id = ?",
                    batch.reports,
                )
                missing = len(batch.reports) - cur.rowcount
                if missing:
                    self._counters["reports_missing"] += missing
                    log.warning("replay.report_for_unknown_transition", count=missing)
                conn.executemany(
                    "UPDATE episodes SET ep_return = ep_return + ?, ended = max(ended, ?, ?)"
                    " WHERE (robot_id, episode_id) ="
                    " (SELECT robot_id, episode_id FROM transitions WHERE id = ?)",
                    [(r[0], r[1], r[2], r[5]) for r in batch.reports],
                )
            results = [self._insert_event(conn, *ev) for ev in batch.events]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if sync_due:
            conn.execute("PRAGMA synchronous=NORMAL")
            self._last_sync = now
        self._rows += len(batch.rows)
        self._counters["transitions_committed"] += len(batch.rows)
        self._counters["bytes_committed"] += batch.obs_bytes
        self._counters["commits"] += 1
        dups = sum(r.duplicate for r in results)
        self._counters["events_duplicate"] += dups
        self._counters["events_committed"] += len(results) - dups
        for ev, result in zip(batch.events, results, strict=True):
            ev[-1].set_result(result)
        for w in batch.waiters:
            if not w.done():
                w.set_result(None)

    @staticmethod
    def _insert_event(
        conn, eid, robot, kind, value, operator, t, t_wall, key, trans, episode, status,
        client_time, resolve, fut,
    ) -> RewardEventResult:  # fmt: skip
        if key is not None:
            row = conn.execute(
                "SELECT id, transition_id, episode_id, status FROM reward_events"
                " WHERE idempotency_key = ?",
                (key,),
            ).fetchone()
            if row is not None:
                return RewardEventResult(*row, duplicate=True)
        close = False
        if resolve is not None:
            try:
                trans, episode, status, close = resolve(conn)
            except Exception as e:  # a broken rule must not lose the event or stop the writer
                log.exception("replay.event_resolve_failed", robot_id=robot, kind=kind)
                trans, close, status = None, False, f"credit_error: {e!r:.200}"
        conn.execute(
            "INSERT INTO reward_events (id, robot_id, kind, value, operator, t, t_wall,"
            " idempotency_key, transition_id, episode_id, status, client_time)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                eid,
                robot,
                kind,
                value,
                operator,
                t,
                t_wall,
                key,
                trans,
                episode,
                status,
                client_time,
            ),
        )
        if close and episode is not None:
            conn.execute(
                "UPDATE episodes SET ended = 1 WHERE robot_id = ? AND episode_id = ?",
                (robot, episode),
            )
        return RewardEventResult(eid, trans, episode, status, duplicate=False)

    def _apply_retention(self) -> None:
        try:
            self._apply_row_cap()
            self._apply_byte_cap()
        except sqlite3.OperationalError as e:  # another process holds the lock: next commit
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            self._counters["retention_busy"] += 1
            log.warning("replay.retention_busy", path=str(self.root), error=str(e))

    def _apply_row_cap(self) -> None:
        max_rows = self.config.retention_max_rows
        if max_rows is None or self._rows <= max_rows:
            return
        cut = self._conn.execute(
            "SELECT id FROM transitions ORDER BY id DESC LIMIT 1 OFFSET ?", (max_rows,)
        ).fetchone()
        if cut is not None:
            self._delete_rows("id <= ?", (cut[0],))
        self._drop_unreferenced_segments()

    def _apply_byte_cap(self) -> None:
        """Keep segments + database file within the cap's share (`retention.DiskBudget`).

        Rows are deleted oldest first, by id rather than by whole segment (with state-only robots
        one segment holds thousands of rows, more than the share), when the segments and the
        pages in use (plus what the last commit added: the next one will add about as much)
        pass the share, down to LOW_WATER of it; segment files go once no row points into them.
        Freed pages are reused by new rows; they are given back to the file system
        (`incremental_vacuum`) only as far as the file itself is over the share, so steady
        writing costs no page moves. Each round writes at most about a quarter of `wal_bytes`
        to the WAL and the WAL is checked after it, so retention cannot outgrow the WAL's
        reserve either."""
        budget = self._budget
        if budget.cap is None:
            return
        segs, in_use, file = self._store()
        growth = max(0, segs + in_use - self._store_bytes)
        page = retention.page_size(self._conn)
        round_pages = max(1, budget.wal_bytes // 4 // page)
        goal = None  # once past the share: delete down to LOW_WATER of it
        for _ in range(_RETENTION_ROUNDS):
            share = budget.store_share(*retention.wal_files_bytes(self.root), self._wal_step)
            if goal is None and segs + in_use + growth > share:
                goal = int(retention.LOW_WATER * max(share, 0))
            excess = 0 if goal is None else segs + in_use + growth - goal
            if excess > 0 and self._rows > 0:
                k = retention.rows_to_delete(excess, self._rows, segs + in_use)
                k = min(k, max(1, round_pages * page * self._rows // max(in_use, 1)))
                cut = self._conn.execute(
                    "SELECT id FROM transitions ORDER BY id LIMIT 1 OFFSET ?", (k - 1,)
                ).fetchone()
                if cut is None:
                    break
                # Rows go first (committed), then files: a crash in between leaves an
                # unreferenced file (deleted at the next retention), never a row without bytes.
                self._delete_rows("id <= ?", (cut[0],))
                self._drop_unreferenced_segments()
            elif self._shrinks and segs + file > share and file > in_use:
                self._vacuum(min(round_pages, -(-(segs + file - share) // page)))
            else:
                break
            if self._checkpointer is not None:
                self._checkpointer.check(self._conn)
            segs, in_use, file = self._store()
        self._store_bytes = segs + in_use

    def _store(self) -> tuple[int, int, int]:
        """(segment bytes, database pages in use, database file bytes after the next
        checkpoint). A file that cannot shrink (created without auto_vacuum) counts as its pages
        in use: that is what retention can act on."""
        in_use, file = retention.db_bytes(self._conn)
        return sum(self._seg_sizes.values()), in_use, file if self._shrinks else in_use

    def _vacuum(self, pages: int | None = None) -> None:
        """Give up to `pages` (all: None) free pages of the database back to the file system
        (when created with auto_vacuum=INCREMENTAL). The file shrinks at the next complete
        checkpoint."""
        if not self._shrinks:
            return
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        n = free if pages is None else min(free, pages)
        if n > 0:
            # One page per step: fetchall runs it to the end.
            self._conn.execute(f"PRAGMA incremental_vacuum({int(n)})").fetchall()
            self._counters["retention_pages_vacuumed"] += n

    def _delete_rows(self, where: str, args: tuple) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        n = conn.execute(f"DELETE FROM transitions WHERE {where}", args).rowcount
        conn.execute(
            "DELETE FROM episodes WHERE last_transition <"
            " coalesce((SELECT min(id) FROM transitions), 1 << 62)"
        )
        conn.execute("COMMIT")
        self._rows -= n
        self._counters["retention_rows_deleted"] += n

    def _drop_unreferenced_segments(self) -> None:
        min_seg = self._conn.execute("SELECT min(seg) FROM transitions").fetchone()[0]
        current = max(self._seg_sizes, default=None)
        for seg in sorted(self._seg_sizes):
            if seg == current or (min_seg is not None and seg >= min_seg):
                break
            self._unlink_segment(seg)

    def _unlink_segment(self, seg: int) -> None:
        segment_path(self._seg_dir, seg).unlink(missing_ok=True)
        self._seg_sizes.pop(seg, None)
        retired = self._unsynced.pop(seg, None)
        if retired is not None:
            retired.close()
        self._counters["retention_segments_deleted"] += 1
        log.info("replay.segment_deleted", segment=seg)
