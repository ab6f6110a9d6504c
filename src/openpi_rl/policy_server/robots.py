"""What the server remembers of each robot between requests, bounded (guarantee 6).

Per robot id: the transitions served to it that a `report` may still name (the last
`report_window`), and, with CURVE, the client key it is bound to. (Its episode and step counter
are the replay's: `replay.ReplayAdder`.) A report is applied only to a transition this server issued to the
robot that reports it (`unknown_transition` otherwise), so one robot cannot reward, end or flag
another's chunks; the robot id, not the connection, owns them, so a robot that reconnects keeps
its transitions. At most `max_robots` robots are remembered: past it the one heard from least
recently is forgotten (a flood of made-up robot ids costs bounded memory, and evicts only idle
robots' state).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict


@dataclasses.dataclass
class _Robot:
    issued: OrderedDict[int, None] = dataclasses.field(default_factory=OrderedDict)
    key: bytes | None = None  # the CURVE client key that first used this robot id


class RobotLedger:
    """`served` records issued ids; `owns` answers whether a report may
    name a transition; `bind_key` ties a robot id to one client key. Serving thread only."""

    def __init__(self, max_robots: int = 4096, report_window: int = 1024):
        if max_robots < 1 or report_window < 1:
            raise ValueError("max_robots and report_window must be >= 1")
        self._robots: OrderedDict[str, _Robot] = OrderedDict()
        self._max, self.report_window = max_robots, report_window
        self.evicted = 0  # robots forgotten to stay within max_robots

    def __len__(self) -> int:
        return len(self._robots)

    def _get(self, robot: str) -> _Robot:
        r = self._robots.get(robot)
        if r is None:
            r = self._robots[robot] = _Robot()
            while len(self._robots) > self._max:
                self._robots.popitem(last=False)
                self.evicted += 1
        else:
            self._robots.move_to_end(robot)
        return r

    def served(self, robot: str, tid: int) -> None:
        """Record transition `tid` served to `robot`."""
        r = self._get(robot)
        r.issued[tid] = None
        if len(r.issued) > self.report_window:
            r.issued.popitem(last=False)

    def owns(self, robot: str, tid: int) -> bool:
        """True if `tid` is among the last `report_window` transitions served to `robot`."""
        r = self._robots.get(robot)
        return r is not None and tid in r.issued

    def bind_key(self, robot: str, key: bytes) -> bool:
        """Tie `robot` to the CURVE client `key` that first uses it; False if another key
        holds it (a robot id cannot be borrowed by another allowed client)."""
        r = self._get(robot)
        if r.key is None:
            r.key = key
        return r.key == key

    def restore(self, robot: str, tids: list[int]) -> None:
        """Seed a robot's issued ids from the replay at start (a restarted server accepts late
        reports for what it served before)."""
        r = self._get(robot)
        for tid in tids[-self.report_window :]:
            r.issued[tid] = None
