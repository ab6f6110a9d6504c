"""The server's side of the replay for served chunks: transition ids reserved before a batch
is answered, each served chunk handed to the replay's adder after the replies, and the robot
ledger seeded from the replay's newest transitions when a server restarts. A mixin of
`PolicyServer` (server.py), run only on its serving thread.
"""

from __future__ import annotations

from typing import Any

import structlog

from openpi_rl.policy_server.metrics import ServerMetrics
from openpi_rl.policy_server.replies import _Pending
from openpi_rl.policy_server.robots import RobotLedger
from openpi_rl.replay import ReplayAdder, ReplayReader, ReplayWriter
from openpi_rl.replay.writer import ReplayClosed, ReplayFull

log = structlog.get_logger("openpi_rl.policy_server")


class Transitions:
    """Transition ids and replay rows; the attributes below are `PolicyServer`'s."""

    adder: ReplayAdder | None
    replay: ReplayWriter | None
    robots: RobotLedger
    metrics: ServerMetrics
    options: Any  # ServeOptions: report_window, max_robots
    _unlogged: int

    def _transition_ids(self, n: int) -> list[int]:
        """Ids for `n` transitions about to be answered; with a replay, only once its queue
        has room for them (ReplayFull / ReplayClosed otherwise: the batch is not served)."""
        if self.adder is None:
            self._unlogged += n
            return list(range(self._unlogged - n + 1, self._unlogged + 1))
        return self.adder.reserve(n)

    def _log_transition(self, p: _Pending, out: Any, i: int, version: int, tid: int) -> None:
        robot = str(p.msg["robot_id"])
        self.robots.served(robot, tid)
        if self.adder is None:
            return
        try:
            self.adder.add(
                tid=tid,
                robot_id=robot,
                episode_id=str(p.msg.get("episode_id", "")),
                observation=p.msg["observation"],  # validated against obs_spec
                prompt=p.msg.get("prompt"),
                actions=out.actions[i],
                policy_actions=out.policy_actions[i],
                logp=float(out.logp[i]),
                value=float(out.value[i]),
                policy_version=version,
                t_mono=p.t_recv,
            )
        except (ReplayFull, ReplayClosed):
            # Only if the writer failed since ensure_room (it logs why): the reply went out.
            self.metrics.errors.labels(code="replay_lost").inc()
            log.error("transition lost: replay writer closed", transition_id=tid)

    def _restore_robots(self) -> None:
        """Seed the robot ledger from the replay's newest transitions (a restarted server
        counts steps on and accepts late reports for chunks it served before)."""
        assert self.replay is not None and self.adder is not None
        with ReplayReader(self.replay.root) as reader:
            recent = reader.recent_by_robot(self.options.report_window, self.options.max_robots)
        for robot, (episode, next_step, tids) in recent.items():
            self.adder.restore(robot, episode, next_step)
            self.robots.restore(robot, tids)
