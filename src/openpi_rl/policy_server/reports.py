"""The report path of the policy server: what a robot may say about a chunk it was served, and
the acknowledgement once the replay has committed it (guarantee 2).

A report is checked against what this server served (robots.py): the transition must be one of
the reporting robot's own (`unknown_transition` otherwise), executed actions must have the
chunk's shape, and the reward is clamped into `reward_range` (counted). The checked report goes
to the replay writer, whose commit thread sets a future; the future's callback hands the report
back to the serving thread (which owns the socket) through a deque and wakes its poll through a
pipe. `completed()` then yields each report with its reply.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import structlog

from openpi_rl.policy_server.metrics import ServerMetrics
from openpi_rl.policy_server.robots import RobotLedger
from openpi_rl.replay import ReplayClosed, ReplayFull, ReplayWriter
from openpi_rl_client import protocol

log = structlog.get_logger("openpi_rl.policy_server")


class Reports:
    """`check(msg)` a report, `submit(request, msg)` it to the replay; the serving thread polls
    `wake_fd` and sends the replies `completed()` yields. Serving thread only, except the
    futures' callbacks (the writer's thread), which only append and write to the pipe."""

    def __init__(
        self,
        robots: RobotLedger,
        action_shape: tuple[int, ...],
        reward_range: tuple[float, float],
        metrics: ServerMetrics,
        replay: ReplayWriter | None,
    ):
        self.robots, self.action_shape, self.metrics = robots, action_shape, metrics
        self.reward_range = reward_range
        self.replay = replay
        self._done: collections.deque[tuple[Any, concurrent.futures.Future, dict]] = (
            collections.deque()
        )
        self.wake_fd, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def check(self, msg: dict) -> tuple[int, float, np.ndarray | None]:
        """(transition id, reward clamped into `reward_range`, executed actions as float32);
        ProtocolError if the report names another robot's or an unknown transition, or its
        executed actions are not the chunk's shape."""
        robot, tid = msg["robot_id"], msg["transition_id"]
        if not self.robots.owns(robot, tid):
            raise protocol.ProtocolError(
                protocol.UNKNOWN_TRANSITION,
                f"transition_id {tid}: not one of the last {self.robots.report_window} "
                f"transitions this server served to robot {robot!r:.80}",
            )
        executed = msg.get("executed_actions")
        if executed is not None:
            if tuple(executed.shape) != self.action_shape:
                raise protocol.ProtocolError(
                    protocol.INVALID_FIELD,
                    f"'executed_actions': expected the chunk's shape {list(self.action_shape)}, "
                    f"got {list(executed.shape)}",
                )
            executed = executed.astype(np.float32)
            if not np.isfinite(executed).all():  # an int64 past float32's range
                raise protocol.ProtocolError(
                    protocol.INVALID_FIELD, "'executed_actions': not finite as float32"
                )
        lo, hi = self.reward_range
        reward = float(msg["reward"])
        if not lo <= reward <= hi:
            self.metrics.rewards_clamped.inc()
            reward = min(max(reward, lo), hi)
        return tid, reward, executed

    def submit(self, request: Any, msg: dict, checked: tuple) -> None:
        """Queue a checked report with the replay; `request` comes back from `completed()`
        once it is committed. ProtocolError(overloaded) if the replay cannot take it."""
        assert self.replay is not None
        tid, reward, executed = checked
        try:
            fut = self.replay.report(
                tid,
                reward,
                bool(msg["done"]),
                bool(msg["truncated"]),
                executed_actions=executed,
                intervened=bool(msg.get("intervened", False)),
                robot_id=msg["robot_id"],
            )
        except (ReplayFull, ReplayClosed) as e:
            raise protocol.ProtocolError(protocol.OVERLOADED, f"replay: {e}") from None

        def done(_: object) -> None:  # the writer's thread: hand it to the serving thread
            self._done.append((request, fut, msg))
            # A full pipe has a wake-up pending; a closed one means the server has stopped.
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")

        fut.add_done_callback(done)

    def completed(self) -> Iterator[tuple[Any, dict]]:
        """Each committed (or refused) report's request and its reply."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_fd, 4096):
                pass
        while self._done:
            request, fut, msg = self._done.popleft()
            yield request, self._reply(fut, msg)

    def _reply(self, fut: concurrent.futures.Future, msg: dict) -> dict:
        try:
            if fut.result():
                return {"ok": True}
            # Stored under another robot, or deleted by retention meanwhile.
            code, text = (
                protocol.UNKNOWN_TRANSITION,
                f"transition_id {msg['transition_id']}: no such transition of robot "
                f"{msg['robot_id']!r:.80} in the replay",
            )
        except ReplayClosed as e:
            code, text = protocol.OVERLOADED, f"replay: {e}"
        except Exception as e:  # refused by the store (counted by the writer)
            log.error("report not stored", error=f"{e!r:.300}")
            code, text = protocol.INTERNAL, "report not stored (see the server log)"
        self.metrics.errors.labels(code=code).inc()
        return protocol.error_reply(code, text)

    def close(self) -> None:
        for fd in (self.wake_fd, self._wake_w):
            os.close(fd)
