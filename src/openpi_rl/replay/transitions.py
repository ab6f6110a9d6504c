"""`TransitionsCommitter`: the transitions writer's caller side and its stage, the same on both
backends.

The policy server calls these (through its `ReplayAdder`): each returns at once, the item goes on
the `Committer`'s bounded queue. A stage (thread `replay-stage`) takes the items in chunks,
encodes each observation record and puts it where the backend keeps it (`_prepare`: the SQLite
writer, `writer.py`, and the PostgreSQL writer with `observations_dir`, `pg_writer.py`, append it
to a segment file; the PostgreSQL writer without it keeps the bytes for the row's transaction),
then passes the chunk on, in caller order, to the commit stage. So the encoding, the checksum
and the copy into the page cache (~0.1 ms for 300 kB) overlap the commits of earlier rows
instead of waiting for them.
"""

from __future__ import annotations

import concurrent.futures
import queue
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog

from openpi_rl.replay import records
from openpi_rl.replay.committer import Committer, ReplayClosed
from openpi_rl.replay.pipeline import (
    APPEND,
    CHUNK,
    REPORT,
    STOP,
    fail_waiters,
    new_waiter,
    take,
)

log = structlog.get_logger("openpi_rl.replay")


class TransitionsCommitter(Committer):
    """A `Committer` that also takes served chunks and the robots' reports, with a stage before
    its commit stage. A subclass says what the stage does to an append (`_prepare`) and starts
    `_run_stage` (thread `replay-stage`) first among its `_threads`."""

    STAGED_CHUNKS: int | None = None
    """Chunks the stage may run ahead of the commit stage (None: `max_queue // CHUNK`, at least
    2). Beyond `max_queue`: what a writer holds while its store is away."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Stage -> commit stage: lists of items, in caller order (a report or event never
        # overtakes the append it refers to).
        chunks = self.STAGED_CHUNKS or max(2, self.config.max_queue // CHUNK)
        self._staged: queue.Queue = queue.Queue(maxsize=chunks)

    def append_transition(
        self,
        robot_id: str,
        episode_id: str,
        step: int,
        policy_version: int,
        obs_bytes: bytes | Callable[[], bytes],
        actions: np.ndarray,
        policy_actions: np.ndarray | None,
        logp: float,
        value: float,
        t_mono: float,
        tid: int | None = None,
    ) -> int:
        """Queue one served action chunk; returns its transition id without waiting for disk.

        `obs_bytes` is the observation record (`records.encode_observation`; not copied: do not
        mutate), or a function that makes it: `ReplayAdder` passes one, so the encoding (and
        the arrays') happens on the writer's thread, not on the server's between a reply and
        the next request. The arrays passed must not change after the call.
        `policy_actions` are the policy's own outputs (e.g. its action tokens) when they differ
        from `actions`. `tid`: an id taken with `new_id()` (default: a new one). Raises
        `ReplayFull` when the queue stays full, `ReplayClosed` after close.
        """
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
            np.asarray(actions),
            None if policy_actions is None else np.asarray(policy_actions),
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
        item += (int(bool(intervened)), records.encode_array(executed), tid)
        self._put((*item, None if robot_id is None else str(robot_id), fut))
        return fut

    def queue_depth(self) -> int:
        """Items handed to the writer and not yet taken into a commit."""
        return super().queue_depth() + sum(map(len, list(self._staged.queue)))

    # ---- stage (thread replay-stage) ---------------------------------------------------------

    def _prepare(self, item: tuple) -> tuple:
        """An APPEND as the row the commit stage writes (its observation record stored, or kept
        for the commit); any other item as it is."""
        raise NotImplementedError

    def _run_stage(self) -> None:
        """Take the callers' items in chunks, prepare each, pass everything on in order to the
        commit stage; end by passing a stop marker on."""
        staged = self._staged
        items: list[tuple] = []
        out: list[tuple] = []
        try:
            while True:
                items = take(self._q, None)
                if self._error is not None:  # the commit stage failed: stop storing bytes
                    break
                out = []  # filled item by item: on a failure it holds what was prepared
                for item in items:
                    out.append(self._prepare(item))
                staged.put(out)
                out = []
                if items[-1][0] == STOP:
                    return
        except BaseException as exc:
            log.exception("replay.stage_failed", path=self.where)
            self._fail(exc)
            staged.put(out)  # what was prepared before the failure still commits
            items = items[len(out) :]
        # Failed (here or in the commit stage), so nothing more is accepted (`_put` checks under
        # the lock `_fail` took): fail whoever still waits in the queue.
        failed = ReplayClosed(f"replay writer failed: {self._error!r}")
        while items:
            fail_waiters(items, failed)
            items = take(self._q, 0)
        staged.put([(STOP,)])

    # ---- commit stage: its items come from the stage -----------------------------------------

    def _take(self, timeout: float | None) -> list[tuple]:
        """A chunk as the stage took it (at most CHUNK items); [] if none came in `timeout`."""
        try:
            return self._staged.get(timeout=timeout)
        except queue.Empty:
            return []

    def _fail_rest(self, failed: ReplayClosed, stopped: bool) -> None:
        while not stopped:  # until the stage stops: it may hold more waiters
            items = self._staged.get()
            fail_waiters(items, failed)
            stopped = any(item[0] == STOP for item in items)
