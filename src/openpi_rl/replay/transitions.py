"""`TransitionsCommitter`: the transitions writer's caller side, the same on both backends.

The policy server calls these (through its `ReplayAdder`): each returns at once, the item goes on
the `Committer`'s bounded queue. What happens next is the backend's: the SQLite writer
(`writer.py`) appends observation bytes to segment files before the row commits; the PostgreSQL
writer (`pg_writer.py`) commits them in the row's transaction.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable

import numpy as np

from openpi_rl.replay import records
from openpi_rl.replay.committer import Committer
from openpi_rl.replay.pipeline import APPEND, REPORT, new_waiter


class TransitionsCommitter(Committer):
    """A `Committer` that also takes served chunks and the robots' reports."""

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
