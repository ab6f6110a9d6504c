"""Episode returns per policy version, from the robots' reports: what automatic rollback and
the pendant's chart compare versions by."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque


class EpisodeReturns:
    """Returns of finished episodes per policy version, from the robots' reports. An episode
    counts for a version only if that version served every chunk of it. Thread-safe: the
    serving thread writes, the swapper reads."""

    def __init__(self, keep_versions: int = 16, keep_episodes: int = 256, max_robots: int = 4096):
        # robot -> [episode_id, version or None (mixed), return]; least recently served first
        self._open: OrderedDict[str, list] = OrderedDict()
        self._done: OrderedDict[int, deque[float]] = OrderedDict()
        self._keep_versions, self._keep_episodes = keep_versions, keep_episodes
        self._max_robots = max_robots  # many robot ids (hostile or not): bounded memory
        self._lock = threading.Lock()

    @property
    def open_episodes(self) -> int:
        """Robots with an episode in progress (at most `max_robots`): its memory's size."""
        with self._lock:
            return len(self._open)

    def served(self, robot: str, episode: str, version: int) -> None:
        with self._lock:
            cur = self._open.get(robot)
            if cur is None or cur[0] != episode:
                self._open[robot] = [episode, version, 0.0]
                while len(self._open) > self._max_robots:
                    self._open.popitem(last=False)
            elif cur[1] != version:
                cur[1] = None
            self._open.move_to_end(robot)

    def reported(self, robot: str, reward: float, ended: bool) -> None:
        with self._lock:
            cur = self._open.get(robot)
            if cur is None:
                return
            cur[2] += reward
            if not ended:
                return
            del self._open[robot]
            if cur[1] is None:
                return
            if cur[1] not in self._done:
                self._done[cur[1]] = deque(maxlen=self._keep_episodes)
                while len(self._done) > self._keep_versions:
                    self._done.popitem(last=False)
            self._done[cur[1]].append(cur[2])

    def last(self, version: int, k: int) -> list[float]:
        with self._lock:
            return list(self._done.get(version, ()))[-k:]
