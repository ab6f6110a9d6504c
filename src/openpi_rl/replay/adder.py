"""`ReplayAdder`: turns the chunks a policy server serves into replay rows (acme's adder).

The server hands it what it served: robot, episode, the validated observation and prompt, the
policy's outputs and version. The adder owns the row's bookkeeping: each robot's step counter
within its running episode (a new `episode_id` starts again at step 0), the observation record
(`records.encode_observation`, encoded once, on the writer's thread), and the ids a reply names before its row is queued
(`reserve`). At most `max_robots` robots are remembered, the one heard from least recently
forgotten first (its next chunk then counts from step 0 of whatever episode it names).
Serving thread only.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np

from openpi_rl.replay import records
from openpi_rl.replay.writer import ReplayWriter


class ReplayAdder:
    """`reserve(n)` ids before the replies go out, then `add(...)` each served chunk."""

    def __init__(self, writer: ReplayWriter, max_robots: int = 4096):
        if max_robots < 1:
            raise ValueError(f"max_robots: expected >= 1, got {max_robots}")
        self.writer = writer
        self._max = max_robots
        self._robots: OrderedDict[str, tuple[str, int]] = OrderedDict()  # -> (episode, next step)

    def reserve(self, n: int) -> list[int]:
        """Ids for `n` chunks about to be answered, once the writer's queue has room for their
        rows (`ReplayFull` / `ReplayClosed` otherwise: serve nothing, the robots resend)."""
        self.writer.ensure_room(n)
        return [self.writer.new_id() for _ in range(n)]

    def add(
        self,
        *,
        tid: int,
        robot_id: str,
        episode_id: str,
        observation: dict[str, np.ndarray],
        prompt: str | None,
        actions: np.ndarray,
        policy_actions: np.ndarray | None,
        logp: float,
        value: float,
        policy_version: int,
        t_mono: float,
    ) -> int:
        """Queue the row of one served chunk (id `tid` from `reserve`); returns its step.
        `ReplayFull` / `ReplayClosed` only if the writer failed since `reserve`."""
        step = self._step(robot_id, episode_id)
        self.writer.append_transition(
            robot_id=robot_id,
            episode_id=episode_id,
            step=step,
            policy_version=policy_version,
            # encoded by the writer's thread: the serving thread goes back to its socket
            obs_bytes=functools.partial(records.encode_observation, observation, prompt),
            actions=actions,
            policy_actions=policy_actions,
            logp=logp,
            value=value,
            t_mono=t_mono,
            tid=tid,
        )
        return step

    def restore(self, robot_id: str, episode_id: str, next_step: int) -> None:
        """Seed a robot's counter (a restarted server counts on from the replay's newest row)."""
        self._remember(robot_id, episode_id, next_step)

    def _step(self, robot: str, episode: str) -> int:
        known = self._robots.get(robot)
        step = known[1] if known is not None and known[0] == episode else 0
        self._remember(robot, episode, step + 1)
        return step

    def _remember(self, robot: str, episode: str, next_step: int) -> None:
        self._robots[robot] = (episode, next_step)
        self._robots.move_to_end(robot)
        while len(self._robots) > self._max:
            self._robots.popitem(last=False)
