"""What the learner reads from the replay: complete rewarded episodes and segments of long ones.

One transition is one served action chunk. Its reward is the sum of the environment rewards
reported while it played (`transitions.reward`) plus the operator's feedback events credited to
it (`reward_events.transition_id`). Episode ends:

- terminal (`done`): the transition is flagged done or carries a `success` / `failure` event;
  no bootstrap.
- time-limit end: flagged `truncated` or carries an `end_episode` event; it bootstraps from the
  value of the next transition's observation or, when there is none, of its own observation.
  (The observation a chunk ended on is never sent to the server, so the last observation the
  policy saw is the best state estimate there is; it keeps the bootstrap roughly at the level
  of V instead of zero, which is what a time limit asks for.)
- a cut: a long open episode is taken in segments of at most `segment_length` chunks; each
  segment bootstraps from the value of the first transition not taken (which stays for the
  next segment).

An episode is complete when its last transition ends it (flag or event) or `episodes.ended`
is set. Data served by a policy more than `max_policy_lag` versions older than the learner's
is dropped (and marked consumed). The learner writes nothing here but the `consumed` flag,
through its own small connection (WAL allows it next to the server's writer; PostgreSQL, next to
every server's); it never opens a `ReplayWriter` on a live store, which would run segment
recovery. The replay is a directory or a postgresql:// URL (`replay.store`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from openpi_rl.replay import ReplayReader, TransitionRow, store

TERMINAL_KINDS = ("success", "failure")
TIME_LIMIT_KINDS = ("end_episode",)

_ROW_COLUMNS = ", ".join(f"t.{f.name}" for f in dataclasses.fields(TransitionRow))
_EVENTS = f"""
    SELECT transition_id AS tid, sum(value) AS reward,
           max(CASE WHEN kind IN ({", ".join(repr(k) for k in TERMINAL_KINDS)}) THEN 1 ELSE 0 END)
               AS terminal,
           max(CASE WHEN kind IN ({", ".join(repr(k) for k in TIME_LIMIT_KINDS)}) THEN 1 ELSE 0 END)
               AS time_limit,
           max(CASE WHEN kind = 'success' THEN 1 ELSE 0 END) AS success
    FROM reward_events WHERE transition_id IS NOT NULL GROUP BY transition_id
"""
# Unconsumed transitions with their event rewards and flags, grouped by episode, serving order.
_PENDING = f"""
    SELECT {_ROW_COLUMNS}, coalesce(e.reward, 0), coalesce(e.terminal, 0),
           coalesce(e.time_limit, 0), coalesce(e.success, 0), coalesce(ep.ended, 0)
    FROM transitions t
    LEFT JOIN ({_EVENTS}) e ON e.tid = t.id
    LEFT JOIN episodes ep ON ep.robot_id = t.robot_id AND ep.episode_id = t.episode_id
    WHERE t.consumed = 0
    ORDER BY t.robot_id, t.episode_id, t.id
"""


@dataclasses.dataclass(frozen=True)
class Step:
    """A stored transition with its full reward and episode-end flags."""

    row: TransitionRow
    reward: float  # env reports + operator events
    done: bool  # terminal: no bootstrap
    time_limit: bool  # truncated / end_episode (and not done): bootstrap
    verdict: bool = False  # an operator event (success, failure, end episode) ended it here
    success: bool = False  # the operator's verdict was success (learning curves' success rate)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Consecutive transitions of one episode, trained as one GAE column.

    bootstrap: the first transition not taken, whose observation's value closes the segment
    (a cut); None when the segment ends its episode (then the last step's own observation is
    used if it ended by a time limit, and nothing if it was terminal).
    """

    robot_id: str
    episode_id: str
    steps: tuple[Step, ...]
    bootstrap: TransitionRow | None

    @property
    def ids(self) -> list[int]:
        return [s.row.id for s in self.steps]

    def __len__(self) -> int:
        return len(self.steps)


@dataclasses.dataclass
class Collected:
    segments: list[Segment]
    stale_ids: list[int]  # dropped for policy lag: mark consumed, count


def split_episode(
    steps: Sequence[Step],
    complete: bool,
    min_version: int,
    segment_length: int,
    settled: int,
) -> tuple[list[Segment], list[int]]:
    """Segments of one episode's unconsumed steps (in serving order), and the ids of stale ones.

    complete: the episode has ended. min_version: steps served by an older policy are stale.
    settled: how many leading steps are old enough to take from an open episode (their late
    reports and feedback have landed). A run of fresh steps followed by a stale one is closed by
    it (cut, bootstrapping from the stale step's observation).
    """
    if segment_length < 1:
        raise ValueError(f"segment_length: expected >= 1, got {segment_length}")
    stale = [s.row.id for s in steps if s.row.policy_version < min_version]
    segments: list[Segment] = []
    n, i = len(steps), 0
    while i < n:
        if steps[i].row.policy_version < min_version:
            i += 1
            continue
        j = i  # the run of fresh steps is steps[i:j]
        while j < n and steps[j].row.policy_version >= min_version:
            j += 1
        ends_episode = j == n and complete
        # Steps that may be taken: all of a closed run; of an open tail, settled ones that still
        # have a successor to bootstrap from.
        limit = j if (j < n or complete) else min(settled, n - 1)
        pos = i
        while pos < limit:
            end = min(pos + segment_length, limit)
            if end == limit and not (ends_episode or j < n) and end - pos < segment_length:
                break  # a short piece of an open episode waits for more steps
            chunk = tuple(steps[pos:end])
            bootstrap = None if (end == n and complete) else steps[end].row
            segments.append(
                Segment(chunk[0].row.robot_id, chunk[0].row.episode_id, chunk, bootstrap)
            )
            pos = end
        i = j
    return segments, stale


class ReplaySource:
    """Reads pending training data from a replay and marks it consumed."""

    def __init__(self, replay_dir: str | Path, reward_limit: float = 1e6):
        self.root = replay_dir
        # A chunk's total reward is clipped into [-limit, limit]: the server clamps each report
        # and the bridge each event, but a sum of many (or a store written by an older
        # version, holding inf) must not turn GAE into NaN and refuse every update after it.
        self.reward_limit = reward_limit
        self.reader = ReplayReader(self.root)
        self._ro = store.connect(self.root)
        self._rw: store.Connection | None = None

    def collect(
        self,
        min_version: int,
        segment_length: int,
        settle_s: float = 0.0,
        now: float | None = None,
    ) -> Collected:
        """Every takeable segment of unconsumed data, oldest first, and the stale ids.

        settle_s: steps of an open episode are taken only once this old (wall clock), so the
        robot's report and the operator's feedback for them have landed; an episode the robot
        ended waits until its last step is this old (the operator's verdict comes after the
        end); one the operator closed (success, failure, end episode) is taken at once.
        """
        cutoff = (time.time() if now is None else now) - settle_s
        episodes: dict[tuple[str, str], tuple[list[Step], bool]] = {}
        # fetchall: the read snapshot is held for the query only, not while rows become objects
        # (a held snapshot keeps the writer from truncating the WAL).
        for r in self._ro.execute(_PENDING).fetchall():
            row = TransitionRow.from_sql(r[:-5])
            ev_reward, terminal, time_limit, success, ended = r[-5:]
            done = bool(row.done or terminal)
            reward = float(row.reward + ev_reward)
            if not -self.reward_limit <= reward <= self.reward_limit:  # NaN and inf too
                reward = -self.reward_limit if reward < 0 else self.reward_limit
            step = Step(
                row,
                reward,
                done,
                bool(row.truncated or time_limit) and not done,
                bool(terminal or time_limit),
                bool(success),
            )
            steps, _ = episodes.setdefault((row.robot_id, row.episode_id), ([], bool(ended)))
            steps.append(step)
        out = Collected([], [])
        for steps, ended in episodes.values():
            last = steps[-1]
            complete = ended or last.done or last.time_limit
            if complete and not last.verdict and last.row.t_wall > cutoff:
                # The robot just ended it: the operator's verdict (success/failure, pressed after
                # the end) lands on its last chunk; taken now, the verdict would never train.
                continue
            settled = sum(1 for s in steps if s.row.t_wall <= cutoff)
            segs, stale = split_episode(steps, complete, min_version, segment_length, settled)
            out.segments += segs
            out.stale_ids += stale
        # Oldest first by the serving time: ids order one writer's rows only. Many servers on
        # one PostgreSQL replay each number theirs from their own boot epoch, so by id the
        # server that opened first would fill every batch and the others' data would go stale.
        out.segments.sort(key=lambda s: (s.steps[0].row.t_wall, s.steps[0].row.id))
        return out

    def observation(self, row: TransitionRow) -> dict[str, np.ndarray]:
        """The model's arrays a transition was served for (the replay decodes its record)."""
        return self.reader.observation(row)

    def mark_consumed(self, ids: Iterable[int]) -> int:
        """Set `consumed = 1` on these transitions (one short write transaction)."""
        ids = list(ids)
        if not ids:
            return 0
        if self._rw is None:
            self._rw = store.connect(self.root, write=True)
        conn, n = self._rw, 0
        store.begin_write(conn)
        try:
            for k in range(0, len(ids), 500):
                part = ids[k : k + 500]
                sql = (
                    f"UPDATE transitions SET consumed = 1 WHERE id IN ({','.join('?' * len(part))})"
                )
                n += conn.execute(sql, part).rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return n

    def close(self) -> None:
        self.reader.close()
        self._ro.close()
        if self._rw is not None:
            self._rw.close()
            self._rw = None
