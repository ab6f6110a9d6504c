"""When to close a micro-batch: serve now, or hold it for robots about to arrive.

Continuous batching serves a request as soon as the model is free. Robots that run in step
(a fleet answered in one batch resends within a millisecond of each other) then split: the
first one back is served alone and the rest wait a whole model call behind it. The server
knows better than to do that: each robot's requests come at a steady interval, so it can
predict who is about to arrive and hold the batch for them, never longer than
`expected_wait_us`. A lone robot, or robots whose next request is not due, are served at once.
"""

from __future__ import annotations

from collections import OrderedDict


class ArrivalForecast:
    """Per robot: the last arrival and a running mean of the interval between arrivals.

    `arrived(robot, t)` on every infer request; `hold_until(...)` says how long a batch that
    opened at `t_first` should wait for the robots predicted to come."""

    def __init__(self, smoothing: float = 0.3, forget_s: float = 2.0, max_robots: int = 1024):
        self._last: OrderedDict[str, float] = OrderedDict()  # robot -> last arrival (oldest first)
        self._interval: dict[str, float] = {}  # robot -> smoothed interval (s)
        self._smoothing, self._forget_s, self._max = smoothing, forget_s, max_robots

    def arrived(self, robot: str, t: float) -> None:
        prev = self._last.pop(robot, None)
        if prev is not None and t > prev:
            iv = self._interval.get(robot)
            gap = t - prev
            self._interval[robot] = gap if iv is None else iv + self._smoothing * (gap - iv)
        self._last[robot] = t  # moved to the end: the dict stays ordered by arrival
        while len(self._last) > self._max:  # many robot ids (hostile or not): bounded memory
            old, _ = self._last.popitem(last=False)
            self._interval.pop(old, None)

    def hold_until(self, t_first: float, now: float, window_s: float, present: set[str]) -> float:
        """The time to serve a batch that opened at `t_first`: the latest predicted arrival of a
        robot not in `present` that falls inside [now - slack, t_first + window_s] (slack: a
        quarter of its interval, for jitter), plus that slack; `t_first` if none is due."""
        until = t_first
        horizon = t_first + window_s
        for robot in reversed(self._last):  # newest first: stop at the robots that went quiet
            last = self._last[robot]
            if now - last > self._forget_s:
                break
            iv = self._interval.get(robot)
            if iv is None or robot in present:
                continue
            due, slack = last + iv, min(0.25 * iv, window_s)
            if now - slack <= due <= horizon:
                until = max(until, min(horizon, max(due, now) + slack))
        return until


__all__ = ["ArrivalForecast"]
