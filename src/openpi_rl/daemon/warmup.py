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

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import structlog
from flax import nnx

from openpi_rl.models.finetune import CRITIC
from openpi_rl.rl.ppo import make_optimizer
from openpi_rl.weights.versions import VersionCheckpoints

if TYPE_CHECKING:
    from openpi_rl.daemon.batch import ChunkBatch

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


class CriticWarmup:
    """The Learner's warm-up steps (mixed into `Learner`: its ac, counters, data-parallel step,
    guard and metrics). `critic_opt_state` is None once no warm-up is left."""

    def _resume_warmup(self) -> Any:
        """The critic warm-up's optimizer state (None when no warm-up is left); a warm-up
        saved past the version's counters, on this version's policy, is applied."""
        left = self.config.critic_warmup_updates - self.counters["critic_warmup_updates"]
        if left <= 0:
            return None
        head = nnx.state(self.ac, CRITIC)
        opt_state = make_optimizer(self.config.ppo).init(head)
        done = self.counters["critic_warmup_updates"]
        found = self.warmup.restore(self.version, done, head, opt_state)
        if found is not None:
            head, opt_state, meta = found
            nnx.update(self.ac, head)
            self.counters.update({k: int(v) for k, v in meta.get("counters", {}).items()})
            log.info(
                "learner.critic_warmup_resumed", version=self.version,
                done=self.counters["critic_warmup_updates"], of=self.config.critic_warmup_updates,
            )  # fmt: skip
        return self.dp.put_replicated(opt_state)

    def _warm_up(self, batch: ChunkBatch, transitions: int) -> tuple[dict[str, float], Any]:
        """One critic warm-up update: only the value head is differentiated and updated (the
        policy's weights come out bit-identical); saved aside, not published. Returns its
        metrics and the guard's refusal (an UpdateResult) or None."""
        done = self.counters["critic_warmup_updates"]
        key = jax.random.fold_in(self.key, 2**30 + done)
        graphdef, head, rest = nnx.split(self.ac, CRITIC, ...)
        head, rest = self.dp.put_replicated(head), self.dp.put_replicated(rest)
        head, opt_state, metrics = self.dp(
            graphdef, head, rest, self.critic_opt_state, key, self.dp.share(batch)
        )
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        refused = self._guard(m, transitions)
        if refused is not None:
            return m, dataclasses.replace(refused, warmup=True)
        nnx.update(self.ac, head)
        self._set_from(nnx.state(self.ac), self.opt_state)
        self.counters["critic_warmup_updates"] = done = done + 1
        self._count("trained", transitions)
        # meta["version"]: the policy it ran on; a restart applies it only on that version.
        self.warmup.save(done, nnx.state(self.ac, CRITIC), opt_state, self._meta(m))
        self.critic_opt_state = opt_state
        if done >= self.config.critic_warmup_updates:
            self.critic_opt_state = None  # the policy moves from the next update on
        self.metrics.critic_warmup.inc()
        log.info(
            "learner.critic_warmup", update=done, of=self.config.critic_warmup_updates,
            version=self.version, value_loss=round(m["value_loss"], 4),
            explained_variance=round(m["explained_variance"], 3),
        )  # fmt: skip
        return m, None


__all__ = ["WARMUP_DIR", "CriticWarmup", "WarmupState"]
