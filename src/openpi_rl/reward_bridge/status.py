"""Live status for the pendants: every `status_interval_s` the bridge reads each robot's
latest transition and recent rewards from the replay (on its own reader thread) and pushes
`status` to the pendants when it changed (and at least every 5 s).

`LiveStatus` is mixed into `RewardBridge` (`server.py`), which owns the reader thread and
closes it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from openpi_rl.replay import schema

if TYPE_CHECKING:
    import sqlite3

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
    _reader: sqlite3.Connection | None

    def _welcome(self, operator: str) -> dict[str, Any]:
        return {
            "type": "welcome",
            "operator": operator,
            "kinds": list(self.rules),
            "status": self._status,
            "queries": self.queries.pending(),
        }

    def _status_message(self) -> dict[str, Any]:
        return {"type": "status", "robots": self._status, "t": time.time()}

    async def _poll_status(self) -> None:
        """Every `status_interval_s`, read each robot's latest transition and recent rewards
        from the replay (the server is another process: the database is the shared truth)."""
        loop = asyncio.get_running_loop()
        last_sent, sent_at = None, 0.0
        while True:
            try:
                status = await loop.run_in_executor(self._db, self._read_status)
            except Exception:  # a locked or missing database must not stop the bridge
                log.exception("bridge.status_failed")
                status = self._status
            self._status = status
            now = time.monotonic()
            if status != last_sent or now - sent_at > 5.0:
                self._broadcast(self._status_message())
                last_sent, sent_at = status, now
            self.metrics.replay_queue_depth.set(self.writer.queue_depth())
            await asyncio.sleep(self.config.status_interval_s)

    def _read_status(self) -> dict[str, dict[str, Any]]:
        if self._reader is None:
            self._reader = schema.connect_reader(Path(self.config.replay_dir))
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
