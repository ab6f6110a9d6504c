"""The Learner's versions on disk: resume at start, save after each update, meta, live arrays.

Mixed into `Learner` (as warmup.py's `CriticWarmup` is): these steps share its model, counters,
checkpoints and data-parallel layout, but are the one place that decides which version a
learner goes on from and how a version is written, so they read apart from the update loop.
A corrupt newer version is skipped, logged and counted, and its number never reused; a LoRA
learner's versions after its base hold only what trains and name the base (weights/versions.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import structlog
from flax import nnx

log = structlog.get_logger("openpi_rl.learner")


class VersionsIO:
    """Resume, save and the arrays they hold (mixed into `Learner`: its ac, checkpoints,
    counters, metrics and data-parallel layout)."""

    def _resume(self, opt_state: Any) -> tuple[int, Any]:
        """(version number, optimiser state) to go on from; updates `self.ac` and counters.
        The newest version that verifies and restores wins; a corrupt newer one is skipped
        (logged, counted) and its number not reused. None on disk: version 0 is saved."""
        versions = self.checkpoints.versions()
        if not versions:
            self._save(0, opt_state, self._meta())
            return 0, opt_state  # what the server serves before any update
        corrupt = 0
        for version in reversed(versions):
            try:
                weights, restored, meta = self.checkpoints.restore(
                    version, nnx.state(self.ac), opt_state
                )
            except Exception as e:  # CorruptVersion, or orbax could not read it
                corrupt += 1
                self.metrics.corrupt_versions.inc()
                log.error(
                    "learner.version_corrupt", version=version, error=str(e),
                    path=str(self.checkpoints.path(version)),
                )  # fmt: skip
                continue
            nnx.update(self.ac, weights)
            self._based_on(version)
            self.counters.update({k: int(v) for k, v in meta.get("counters", {}).items()})
            self.counters["corrupt_versions"] += corrupt
            self.rollback_id = int(meta.get("rollback_id", 0))
            log.info(
                "learner.resumed", version=versions[-1], weights_of=version,
                path=str(self.checkpoints.path(version)), skipped_corrupt=corrupt,
            )  # fmt: skip
            return versions[-1], restored
        self.counters["corrupt_versions"] += corrupt
        log.error("learner.no_version_restores", versions=versions, start="seed weights")
        return versions[-1], opt_state

    def _based_on(self, version: int) -> None:
        """The learner now holds `version`'s weights: a LoRA learner's next versions are deltas
        over that version's base (or over it, a full version)."""
        if self.finetune == "lora":
            base = self.checkpoints.base_of(version)
            self.base = version if base is None else base

    def _save(self, version: int, opt_state: Any, meta: dict[str, Any]) -> Path:
        """Save `version`: with LoRA and a base on disk, only what trains (a delta)."""
        if self.finetune == "lora" and self.base is not None and self.base != version:
            weights = nnx.state(self.ac, self.trainable)
            return self.checkpoints.save(version, weights, opt_state, meta, base=self.base)
        path = self.checkpoints.save(version, nnx.state(self.ac), opt_state, meta)
        if self.finetune == "lora":
            self.base = version  # full weights on disk: the next versions apply to these
        return path

    def _set_from(self, weights: nnx.State, opt_state: Any) -> None:
        """Hold `weights` and `opt_state`, as global arrays laid out for the update (`self.ac`
        too: its state is what versions save)."""
        nnx.update(self.ac, weights)
        _, params, rest = nnx.split(self.ac, self.trainable, ...)
        self.params, self.rest = self.dp.put_state(params), self.dp.put_replicated(rest)
        self.opt_state = self.dp.put_state(opt_state)
        nnx.update(self.ac, self.params, self.rest)

    def _meta(self, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        finite = {k: v for k, v in (metrics or {}).items() if math.isfinite(v)}
        return {
            "version": self.version,
            "t_wall": time.time(),
            "counters": dict(self.counters),
            "rollback_id": self.rollback_id,
            "metrics": finite,
            "model": type(self.config.model).__name__,
        }


__all__ = ["VersionsIO"]
