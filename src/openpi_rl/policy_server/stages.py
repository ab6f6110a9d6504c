"""The server's stages and their failure: the replay writer, the hot-swap stage (`SwapStage`,
swapper.py's `Swapper`) and the threads of front ends registered with `watch()`. A dead stage
fails health and ends the serving loop, so the supervisor restarts the process. A mixin of
`PolicyServer` (server.py); `_check_stages` runs on its serving thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from openpi_rl.policy_server.metrics import ServerMetrics
from openpi_rl.replay import ReplayWriter

log = structlog.get_logger("openpi_rl.policy_server")


class SwapStage(Protocol):
    """What the server asks of its hot-swap stage (policy_server/swapper.py's `Swapper`)."""

    def died(self) -> bool: ...

    def health(self) -> dict[str, Any]: ...


class Stages:
    """Stage watching; the attributes below are `PolicyServer`'s."""

    replay: ReplayWriter | None
    swapper: SwapStage | None
    metrics: ServerMetrics
    failure: str | None
    _stages: dict[str, Callable[[], bool]]
    _next_check: float
    _stop: threading.Event

    def _check_stages(self) -> None:
        """A dead stage (replay writer, swapper) fails health and ends `run()`, so the process
        exits non-zero and its supervisor restarts it: serving on without it would answer
        robots with actions that are never stored, or never improve."""
        self._next_check = time.perf_counter() + 0.1
        if self.failure is not None:
            return
        if self.replay is not None and self.replay.error is not None:
            self.failure = f"replay writer failed: {self.replay.error!r:.300}"
        elif self.swapper is not None and self.swapper.died():
            self.failure = "swapper thread died (see the log)"
        else:
            dead = [name for name, alive in self._stages.items() if not alive()]
            if dead:
                self.failure = f"{dead[0]} thread died (see the log)"
        if self.failure is not None:
            log.error(
                "stage failed: stopping so the supervisor restarts the server", reason=self.failure
            )
            self.metrics.ready.set(0)
            self._stop.set()

    def watch(self, name: str, alive: Callable[[], bool]) -> None:
        """Treat `name` (a front end's thread: the openpi WebSocket, admin) as a stage of this
        server: while `run()` serves, `alive()` turning False fails health and ends it."""
        self._stages[name] = alive
