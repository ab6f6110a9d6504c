"""`Committer`: what both replay writers share, the caller side and the commit stage.

The transitions writer (`writer.py`, the policy server's, which owns the segment files) and the
events writer (`events_writer.py`, the reward bridge's) are each a `Committer`: callers get an id
back at once and the item goes on a bounded queue (`ReplayFull` when it stays full); the commit
stage (thread `replay-writer`) commits the SQLite transaction holding the items every
`commit_interval_s`, at once when someone waits on one (an event passed with `wait=True` is
acknowledged only after its commit). A commit another process holds the write lock for is
rolled back and retried, never dropped; with `fsync_interval_s` the commit that syncs the WAL
comes that often. Each id is `(boot_epoch << SEQ_BITS) | seq`, the epoch committed at open, so
two writers of one store, or a writer before and after a crash, never hand out the same id.
A subclass says where the commit stage takes its items from (`_take`) and what else a commit
syncs and counts (`_sync_files`, `_count_committed`); the items and the SQL are `pipeline.py`'s.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Protocol, Self

import structlog

from openpi_rl.replay.pipeline import (
    BARRIER,
    EVENT,
    ITEM_ERRORS,
    STOP,
    Batch,
    ItemRefused,
    Resolve,
    fail_waiters,
    new_waiter,
    take,
    wait_for,
    write_batch,
    write_isolated,
)

log = structlog.get_logger("openpi_rl.replay")

# id = (boot_epoch << SEQ_BITS) | seq. The epoch is committed at open, before any id is handed
# out, so ids given out but never committed before a crash are never reused. 40 bits of seq is
# ~35 years at 1000 rows/s per boot; ids stay below 2**53 (JSON-safe) for the first 8191 boots.
SEQ_BITS = 40
SEQ_MASK = (1 << SEQ_BITS) - 1

# Counted by every writer; the transitions writer counts more (its rows, retention).
COUNTERS = ("commits", "events_committed", "events_duplicate", "commit_retries", "items_refused")


class ReplayFull(Exception):
    """The writer's queue stayed full for `enqueue_timeout_s`: the disk cannot keep up."""


class ReplayClosed(Exception):
    """The writer was closed (or its thread failed); nothing more is accepted."""


class CommitSettings(Protocol):
    """The fields of `ReplayConfig` and `ReplayEventsConfig` a `Committer` reads."""

    @property
    def commit_interval_s(self) -> float: ...
    @property
    def fsync_interval_s(self) -> float | None: ...
    @property
    def max_queue(self) -> int: ...
    @property
    def enqueue_timeout_s(self) -> float: ...


def next_boot_epoch(conn: sqlite3.Connection) -> int:
    """Commit and return this open's boot epoch (one more than the last one stored)."""
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


class Committer:
    """A writer's queue, ids, reward events and commit stage. Thread-safe to call; `close()`
    flushes. A subclass opens `conn` (and whatever else it owns), calls this `__init__`, and
    starts `self._threads` (the commit stage, `_run`, among them)."""

    def __init__(
        self,
        config: CommitSettings,
        root: Path | str,
        conn: Any,
        counters: tuple,
        where: str | None = None,
    ):
        """root: the replay's location (a directory, or a PostgreSQL URL); `where` names it in
        logs and errors (default: root; a URL with its password masked)."""
        self.config = config
        self.root = root
        self.where = str(root) if where is None else where
        self._conn = conn
        self.boot_epoch = self._next_boot_epoch()
        self._id_base = self.boot_epoch << SEQ_BITS
        self._seq = 0
        self._id_lock = threading.Lock()
        self._counters = dict.fromkeys(counters, 0)
        self._last_sync = time.monotonic()
        self._q: queue.Queue = queue.Queue(maxsize=config.max_queue)
        self._put_lock = threading.Lock()
        self._closed = False
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []  # the first one takes callers' items

    # ---- caller side -------------------------------------------------------------------------

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
        return self._q.qsize()

    def counters(self) -> dict[str, int]:
        """Totals since open, for metrics (`openpi_rl_replay_<name>_total`)."""
        return dict(self._counters)

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop accepting, commit everything queued, close files. Idempotent."""
        with self._put_lock:
            if self._closed:
                already = True
            else:
                already, self._closed = False, True
        deadline = None if timeout is None else time.monotonic() + timeout
        if not already and self._threads[0].is_alive():
            try:  # a full queue that does not drain (the store is down) must not hang close
                self._q.put((STOP,), timeout=timeout)
            except queue.Full:
                raise TimeoutError(
                    f"replay writer for {self.where}: {self._q.qsize()} items still queued after "
                    f"{timeout} s (is the store reachable?)"
                ) from None
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise TimeoutError(f"replay writer ({t.name}) did not finish within {timeout} s")
        self._close_files(deadline, timeout)
        if self._conn is not None:
            self._conn.close()
            self._conn = None  # type: ignore[assignment]
            log.info("replay.close", path=self.where, **self._counters)

    def __enter__(self) -> Self:
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
                    raise ReplayClosed(f"replay writer for {self.where} is closed{cause}")
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

    def _fail(self, exc: BaseException) -> ReplayClosed:
        with self._put_lock:
            self._error = self._error or exc
            self._closed = True
        # Wake the first stage if it waits for work (a full queue: it is busy, and sees the
        # failure before its next wait).
        with contextlib.suppress(queue.Full):
            self._q.put_nowait((STOP,))
        return ReplayClosed(f"replay writer failed: {exc!r}")

    # ---- what a subclass adds ----------------------------------------------------------------

    def _take(self, timeout: float | None) -> list[tuple]:
        """The commit stage's next items, in caller order; [] if none came within `timeout`."""
        return take(self._q, timeout)

    def _fail_rest(self, failed: ReplayClosed, stopped: bool) -> None:
        """After a failure of the commit stage: fail whoever still waits on a commit."""
        while True:
            try:
                fail_waiters([self._q.get_nowait()], failed)
            except queue.Empty:
                break

    def _next_boot_epoch(self) -> int:
        return next_boot_epoch(self._conn)

    def _stage(self, item: tuple, batch: Batch) -> None:
        batch.add(item)

    def _sync_files(self) -> None:
        """Before a commit that syncs the WAL: sync what its rows point at."""

    def _count_committed(self, batch: Batch) -> None:
        """After a commit: count what it stored beyond events."""

    def _close_files(self, deadline: float | None, timeout: float | None) -> None:
        """In close(), after the stages ended and before the database closes."""

    # ---- commit stage (thread replay-writer) -------------------------------------------------

    def _run(self) -> None:
        batch = Batch()
        deadline: float | None = None  # commit by then: commit_interval after the batch began
        stop = False
        try:
            while not stop:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                for item in self._take(timeout):
                    if item[0] == STOP:
                        stop = True
                    else:
                        self._stage(item, batch)
                if batch and deadline is None:
                    deadline = time.monotonic() + self.config.commit_interval_s
                urgent = bool(batch.waiters) or stop
                if batch and (urgent or time.monotonic() >= deadline):  # type: ignore[operator]
                    self._commit(batch)
                    batch, deadline = Batch(), None
        except BaseException as exc:
            log.exception("replay.writer_failed", path=self.where)
            failed = self._fail(exc)
            fail_waiters([(BARRIER, w) for w in batch.waiters], failed)
            self._fail_rest(failed, stop)

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
                log.warning("replay.commit_busy_retry", path=self.where, error=str(e))
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
            self._sync_files()
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
        self._committed(batch, results, found)

    def _committed(self, batch: Batch, results: list, found: list) -> None:
        """After `batch` committed: count it and set its waiters (each event's and report's
        result, or the `ItemRefused` it got)."""
        self._count_committed(batch)
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
