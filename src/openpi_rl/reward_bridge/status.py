"""Live status for the pendants: every `status_interval_s` the bridge reads each robot's
latest transition and recent rewards from the replay (on its own reader thread) and pushes
`status` to the pendants when it changed (and at least every 5 s). On the same tick:

- `returns` (the chart): mean return per policy version (`replay.returns`), re-read every
  `returns_interval_s` and pushed to every pendant when it changed;
- `frame`: for each robot some pendant shows, its latest transition's camera images as JPEG
  thumbnails (`frames.py`), made at most once per `frame_interval_s` and only for a newer
  transition, cached, and sent to the pendants showing that robot (a pendant with messages
  still waiting skips a frame rather than queue it).

`LiveStatus` is mixed into `RewardBridge` (`server.py`), which owns the reader thread and
closes its readers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import TYPE_CHECKING, Any

import structlog

from openpi_rl.replay import CorruptRecord, MissingRecord, ReplayReader, store
from openpi_rl.replay.returns import mean_return_per_version
from openpi_rl.reward_bridge.frames import frame_message

if TYPE_CHECKING:
    from openpi_rl.replay import ReplayEventsWriter
    from openpi_rl.reward_bridge.config import BridgeConfig
    from openpi_rl.reward_bridge.credit import CreditRule
    from openpi_rl.reward_bridge.metrics import BridgeMetrics
    from openpi_rl.reward_bridge.query import QueryBroker

log = structlog.get_logger("openpi_rl.reward_bridge")


class LiveStatus:
    """The status poller and the messages built from it. From the bridge it uses the fields
    below and `_broadcast`."""

    config: BridgeConfig
    metrics: BridgeMetrics
    rules: dict[str, CreditRule]
    queries: QueryBroker
    writer: ReplayEventsWriter
    _status: dict[str, dict[str, Any]]
    _db: concurrent.futures.ThreadPoolExecutor  # the reader's one thread
    _reader: store.Connection | None
    _replay: ReplayReader | None  # observations for frames, on the reader's thread too
    _pendants: dict[Any, str | None]  # connection -> robot shown
    _frames: dict[str, dict[str, Any]]  # robot -> its newest frame message (cache)
    _frame_made: dict[str, float]  # robot -> when its last frame was made (monotonic)
    _returns: list[dict[str, Any]]

    def _welcome(self, operator: str) -> dict[str, Any]:
        return {
            "type": "welcome",
            "operator": operator,
            "kinds": list(self.rules),
            "status": self._status,
            "queries": self.queries.pending(),
            "returns": self._returns,
        }

    def _status_message(self) -> dict[str, Any]:
        return {"type": "status", "robots": self._status, "t": time.time()}

    async def _poll_status(self) -> None:
        """Every `status_interval_s`, read each robot's latest transition and recent rewards
        from the replay (the server is another process: the database is the shared truth)."""
        loop = asyncio.get_running_loop()
        last_sent, sent_at, returns_at = None, 0.0, -float("inf")
        while True:
            try:
                status = await loop.run_in_executor(self._db, self._read_status)
            except Exception as e:  # a locked, missing or unreachable database must not stop it
                _log_read_failure("bridge.status_failed", e)
                status = self._status
            self._status = status
            now = time.monotonic()
            if status != last_sent or now - sent_at > 5.0:
                self._broadcast(self._status_message())
                last_sent, sent_at = status, now
            if now - returns_at >= self.config.returns_interval_s:
                returns_at = now
                await self._push_returns(loop)
            if self.config.frame_interval_s is not None:
                await self._push_frames(loop)
            self.metrics.replay_queue_depth.set(self.writer.queue_depth())
            await asyncio.sleep(self.config.status_interval_s)

    async def _push_returns(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            returns = await loop.run_in_executor(self._db, self._read_returns)
        except Exception as e:  # as for the status: keep the last chart
            _log_read_failure("bridge.returns_failed", e)
            return
        if returns != self._returns:
            self._returns = returns
            self._broadcast({"type": "returns", "versions": returns})

    def _read_returns(self) -> list[dict[str, Any]]:
        if self._reader is None:
            self._reader = store.connect(self.config.replay_dir)
        return [
            r._asdict() for r in mean_return_per_version(self._reader, self.config.returns_episodes)
        ]

    async def _push_frames(self, loop: asyncio.AbstractEventLoop) -> None:
        """A new frame for each watched robot whose latest transition changed, at most once per
        `frame_interval_s` per robot; the cache forgets robots nobody watches."""
        watched = {robot for robot in self._pendants.values() if robot is not None}
        for robot in set(self._frames) - watched:
            del self._frames[robot]
        for robot in set(self._frame_made) - watched:
            del self._frame_made[robot]
        interval = self.config.frame_interval_s or 0.0
        for robot in sorted(watched):
            tid = (self._status.get(robot) or {}).get("transition_id")
            cached = self._frames.get(robot)
            if tid is None or (cached is not None and cached["transition_id"] == tid):
                continue
            now = time.monotonic()
            if now - self._frame_made.get(robot, -float("inf")) < interval:
                continue
            self._frame_made[robot] = now
            try:
                frame = await loop.run_in_executor(self._db, self._read_frame, robot, tid)
            except Exception:  # a bug or a broken store: say so on the page, keep polling
                log.exception("bridge.frame_failed", robot_id=robot, transition_id=tid)
                self.metrics.frames.labels("unreadable").inc()
                note = f"transition {tid}: its observation could not be read (see the bridge log)"
                frame = frame_message(robot, tid, None, self.config.frame_max_side, note)
            self._frames[robot] = frame
            self._send_watching(robot, frame)

    def _read_frame(self, robot: str, tid: int) -> dict[str, Any]:
        """The frame message of transition `tid` (the robot's newest), on the reader's thread."""
        if self._replay is None:
            self._replay = ReplayReader(self.config.replay_dir)
        side = self.config.frame_max_side
        rows = self._replay.transitions(since_id=tid - 1, limit=1)  # the row with id tid
        if not rows or rows[0].id != tid or rows[0].robot_id != robot:
            self.metrics.frames.labels("unreadable").inc()
            return frame_message(robot, tid, None, side, f"transition {tid} is gone (retention)")
        when = {"step": rows[0].step, "t_wall": rows[0].t_wall}
        try:
            arrays = self._replay.observation(rows[0])
        except (MissingRecord, CorruptRecord, ValueError) as e:
            self.metrics.frames.labels("unreadable").inc()
            return frame_message(robot, tid, None, side, str(e), **when)
        frame = frame_message(robot, tid, arrays, side, **when)
        self.metrics.frames.labels("images" if frame["cameras"] else "no_image").inc()
        return frame

    def _read_status(self) -> dict[str, dict[str, Any]]:
        if self._reader is None:
            self._reader = store.connect(self.config.replay_dir)
        q = self._reader.execute
        robots = {r for (r,) in q("SELECT DISTINCT robot_id FROM episodes")}
        out = {}
        for robot in sorted(robots | set(self.config.robots)):
            row = q(
                "SELECT t.id, t.episode_id, t.step, t.policy_version, t.t_wall, e.ended"
                " FROM transitions t LEFT JOIN episodes e"
                " ON e.robot_id = t.robot_id AND e.episode_id = t.episode_id"
                " WHERE t.robot_id = ? ORDER BY t.t_wall DESC LIMIT 1",
                (robot,),
            ).fetchone()
            recent = q(
                "SELECT kind, value, operator, status, t, transition_id FROM reward_events"
                " WHERE robot_id = ? ORDER BY t DESC LIMIT 5",
                (robot,),
            ).fetchall()
            keys = ("kind", "value", "operator", "status", "t", "transition_id")
            out[robot] = {
                "transition_id": row and row[0],
                "episode_id": row and row[1],
                "step": row and row[2],
                "policy_version": row and row[3],
                "t_wall": row and row[4],
                "episode_ended": bool(row and row[5]),
                "recent": [dict(zip(keys, r, strict=True)) for r in recent],
            }
        return out


def _log_read_failure(event: str, error: Exception) -> None:
    """A database away for a while (PostgreSQL restarting: its reader reconnects on the next
    poll) is a warning; anything else, with its traceback, an error."""
    if isinstance(error, store.unavailable_errors()):
        log.warning(event, error=f"{error!r:.200}")
    else:
        log.error(event, exc_info=error)
