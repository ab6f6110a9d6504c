"""What the swapper shows: the learner's liveness from its heartbeats, how far the live version
is behind, the `health` fields the serving thread adds to its reply, and the admin's `status`
(swap history, rollback targets, episode returns). Read-only; a mixin of `Swapper`
(swapper.py). Its reads feed the metrics' gauges too.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openpi_rl.policy_server.options import SwapOptions
from openpi_rl.weights.notices import LatestVersion

if TYPE_CHECKING:
    from openpi_rl.policy_server.restore_worker import RestoreWorker
    from openpi_rl.policy_server.server import PolicyServer


class SwapStatus:
    """Liveness and reports; the attributes below are `Swapper`'s."""

    server: PolicyServer
    options: SwapOptions
    _sub: LatestVersion | None
    _worker: RestoreWorker | None
    _started_t: float
    _last_swap_t: float | None
    newest: tuple[int, Path] | None
    previous: int | None
    pinned: int | None
    learning_paused: bool
    swaps: int
    last_swap_s: float | None
    rejected: set[int]
    failed: dict[int, str]
    refused_notices: dict[int, str]

    def checkpoint_dir(self) -> Path | None: ...  # Swapper's

    def versions_on_disk(self) -> list[int]: ...  # Swapper's

    @property
    def notices(self) -> LatestVersion | None:
        """The learner's notice channel as read so far (heartbeats, malformed notices); None
        when no learner is followed."""
        return self._sub

    @property
    def restore_worker(self) -> RestoreWorker | None:
        """The process that restores versions; None while none runs (`restore_in_worker=False`,
        or not started yet)."""
        return self._worker

    def heartbeat_age(self) -> float:
        t = self._sub.heartbeat_t if self._sub is not None else None
        return time.monotonic() - (t if t is not None else self._started_t)

    def learner_alive(self) -> bool:
        return self._sub is not None and self.heartbeat_age() < self.options.peer_timeout_s

    def learner_state(self) -> str | None:
        beat = self._sub.last_heartbeat if self._sub is not None else None
        return None if beat is None else beat.get("state")

    def versions_behind(self) -> int:
        return 0 if self.newest is None else max(0, self.newest[0] - self.server.snapshot.version)

    def seconds_since_swap(self) -> float:
        return time.monotonic() - (self._last_swap_t or self._started_t)

    def health(self) -> dict[str, Any]:
        """What `health` replies add: cheap fields only (the serving thread builds it)."""
        age = self.heartbeat_age()
        return {
            "learner": {
                "alive": self.learner_alive(),
                "state": self.learner_state(),
                "version": None if self.newest is None else self.newest[0],
                "heartbeat_age_s": round(age, 3) if math.isfinite(age) else None,
            },
            "versions_behind": self.versions_behind(),
            "pinned": self.pinned,
            "learning_paused": self.learning_paused,
        }

    def status(self) -> dict[str, Any]:
        """The admin's `status`: health plus swap history, rollback targets and episode returns."""
        live = self.server.snapshot.version
        k = max(self.options.auto_rollback_episodes, 1)

        def returns(v: int | None) -> dict | None:
            if v is None:
                return None
            r = self.server.returns.last(v, 256)
            return {"episodes": len(r), "mean_return": sum(r) / len(r) if r else None}

        return {
            "policy_version": live,
            **self.health(),
            "previous": self.previous,
            "swaps": self.swaps,
            "seconds_since_swap": round(self.seconds_since_swap(), 3),
            "last_swap_s": self.last_swap_s,
            "rejected": sorted(self.rejected),
            "failed": {str(v): why for v, why in self.failed.items()},
            "refused_notices": {str(v): why for v, why in self.refused_notices.items()},
            "checkpoint_dir": None if self.checkpoint_dir() is None else str(self.checkpoint_dir()),
            "versions_on_disk": self.versions_on_disk(),
            "compilations": self.server.snapshot.compilations,
            "episode_returns": {"live": returns(live), "previous": returns(self.previous)},
            "auto_rollback_episodes": k if self.options.auto_rollback_episodes else 0,
        }
