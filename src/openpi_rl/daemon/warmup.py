"""The critic warm-up's state between restarts.

With `critic_warmup_updates = N`, the learner's first N updates train only the value head (a
fresh head on a pretrained policy knows nothing of the returns; piRL warms it up the same way
before the policy moves). They publish nothing: the policy did not change, so a swap would be
wasted, and the version number, which measures how stale the replay's data is, must not move
either. Each one saves the value head, its optimizer state and the learner's counters here,
under `<checkpoint_dir>/.critic_warmup/<n>/` (orbax, with a manifest; newest only; servers
never look there), so a learner restarted during the warm-up goes on counting from where it
stopped. The first PPO update after the warm-up starts a fresh optimizer state over everything
that trains (Adam's moments of the policy's weights start at that update, not N updates late).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
from flax import nnx

from openpi_rl.weights.versions import VersionCheckpoints

log = structlog.get_logger("openpi_rl.learner")

WARMUP_DIR = ".critic_warmup"


class WarmupState:
    """`save` after each warm-up update; `restore` once at start."""

    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoints = VersionCheckpoints(Path(checkpoint_dir) / WARMUP_DIR, max_to_keep=1)

    def save(self, done: int, head: nnx.State, opt_state: Any, meta: dict[str, Any]) -> None:
        """done: warm-up updates made so far (the step number on disk)."""
        self.checkpoints.save(done, head, opt_state, meta)

    def restore(
        self, version: int, done: int, head_like: nnx.State, opt_like: Any
    ) -> tuple[nnx.State, Any, dict[str, Any]] | None:
        """(value head, its optimizer state, meta) of the newest warm-up past `done` updates
        that ran on `version`'s policy; None when there is none, or it does not restore
        (logged: the warm-up goes on from the version's value head)."""
        steps = self.checkpoints.versions()
        if not steps or steps[-1] <= done:
            return None
        try:
            head, opt_state, meta = self.checkpoints.restore(steps[-1], head_like, opt_like)
        except Exception as e:
            log.error("learner.critic_warmup_unreadable", step=steps[-1], error=str(e))
            return None
        if meta.get("version") != version:
            return None  # a warm-up on another version's policy (e.g. rolled back past it)
        return head, opt_state, meta

    def close(self) -> None:
        self.checkpoints.close()


__all__ = ["WARMUP_DIR", "WarmupState"]
