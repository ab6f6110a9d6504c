"""When to close a micro-batch: serve now, or hold it for robots about to arrive.

Continuous batching serves a request as soon as the model is free. Robots that run in step
(a fleet answered in one batch resends within a millisecond of each other) then split: the
first one back is served alone and the rest wait a whole model call behind it. The server
knows better than to do that: a robot's next request follows its last reply after a steady
"think time" (its control loop: near zero for a closed loop, the rest of its period for a
fixed-rate one), so the server can predict who is about to arrive and hold the batch for
them, never longer than `expected_wait_us`. A lone robot, or robots not yet due, are served
at once.

A fleet that pauses together (an episode reset for all, a restart) comes back overdue: no
forecast holds for it, and the first robot back would be served alone again. So a robot
also waits, for one window at most, for the overdue robots it was last served with (its
cohort); a robot that was served alone has none.
"""

from __future__ import annotations

from collections import OrderedDict


class ArrivalForecast:
    """Per robot: when its last reply left and a running estimate of its think time (reply to
    next request). `arrived` on every new infer request, `replied` when its reply is sent;
    `hold_until(...)` says how long a batch that opened at `t_first` should wait."""

    def __init__(self, smoothing: float = 0.3, forget_s: float = 2.0, max_robots: int = 1024):
        self._replied: OrderedDict[str, float] = OrderedDict()  # robot -> last reply (oldest first)
        self._waiting: set[str] = set()  # robots with a request the server has not answered
        self._think: dict[str, float] = {}  # robot -> smoothed think time (s)
        self._cohort: dict[str, frozenset[str]] = {}  # robot -> the others in its last batch
        self._smoothing, self._forget_s, self._max = smoothing, forget_s, max_robots

    def arrived(self, robot: str, t: float) -> None:
        last = self._replied.get(robot)
        if last is not None and robot not in self._waiting and t >= last:
            gap, est = t - last, self._think.get(robot)
            # A pause (an episode reset, an idle robot) is not the loop's pace: a gap counts
            # for at most twice the estimate, so real slow-downs still move it.
            self._think[robot] = (
                gap if est is None else est + self._smoothing * (min(gap, 2 * est + 1e-4) - est)
            )
        self._waiting.add(robot)

    def replied(self, robot: str, t: float, batch: frozenset[str] = frozenset()) -> None:
        """`batch`: the robots served in the same model call (the robot itself may be in it)."""
        self._waiting.discard(robot)
        self._replied.pop(robot, None)
        self._replied[robot] = t  # moved to the end: the dict stays ordered by reply time
        self._cohort[robot] = batch - {robot}
        while len(self._replied) > self._max:  # many robot ids (hostile or not): bounded memory
            old, _ = self._replied.popitem(last=False)
            self._think.pop(old, None)
            self._cohort.pop(old, None)
            self._waiting.discard(old)

    def __len__(self) -> int:
        """Robots it remembers (at most `max_robots`)."""
        return len(self._replied)

    def think_time(self, robot: str) -> float | None:
        """The robot's estimated think time in seconds; None while unknown (or forgotten)."""
        return self._think.get(robot)

    def dropped(self, robot: str) -> None:
        """The robot's request was answered with an error (it was not served)."""
        self._waiting.discard(robot)

    def hold_until(self, t_first: float, now: float, window_s: float, present: set[str]) -> float:
        """The time to serve a batch that opened at `t_first`: the end of the window
        (`t_first + window_s`) while an answered robot not in `present` is predicted within
        it (or late by less than the window: scheduling jitter), or is overdue and was last
        served with a robot in `present`; else `t_first` (serve now). A robot that stopped
        costs at most one window per batch, and nothing once silent for `forget_s`."""
        horizon = t_first + window_s
        cohort = frozenset().union(*(self._cohort.get(r, ()) for r in present))
        for robot in reversed(self._replied):  # newest first: stop at robots that went quiet
            last = self._replied[robot]
            if now - last > self._forget_s:
                break
            think = self._think.get(robot)
            if think is None or robot in present or robot in self._waiting:
                continue
            due = last + think
            if now - window_s <= due <= horizon or (due < now - window_s and robot in cohort):
                return horizon
        return t_first


__all__ = ["ArrivalForecast"]
