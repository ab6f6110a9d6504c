"""The operator's decisions, as the Learner applies them: rollbacks and pauses.

Mixed into `Learner` (as warmup.py's `CriticWarmup` is). The operator's state file
(weights/operator_state.py, written by the policy server's admin) is read at start and between
updates: a rollback the learner has not applied yet makes it continue from the rollback
target's weights and optimiser state (the next version is still newest + 1, so the version
rolled back from stays behind for good); a pause, from a server or the persisted switch, holds
updates, even while no server answers. Process 0 reads the file; every process applies a
rollback (the turn carries it, lockstep.py).
"""

from __future__ import annotations

import structlog
from flax import nnx

from openpi_rl.daemon.lockstep import Turn
from openpi_rl.weights.operator_state import load_state, state_path

log = structlog.get_logger("openpi_rl.learner")


class OperatorDecisions:
    """Rollback and pause (mixed into `Learner`: its checkpoints, lockstep, publisher, servers,
    operator state and metrics)."""

    def check_operator(self) -> None:
        """Re-read the operator's state file when it changed (a stat per call); apply a
        rollback not applied yet: train on from its target's weights and optimiser state.
        Process 0's: the other processes apply the rollback it sends them."""
        due = self._rollback_due()
        if due is not None:
            self._play(self.lockstep.send(Turn(rollback=due)))

    def _rollback_due(self) -> tuple[int, int] | None:
        """(target, rollback id) of an operator rollback not applied yet, when the operator's
        state file changed; None otherwise."""
        path = state_path(self.checkpoints.directory)
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._operator_mtime:
            return None
        self._operator_mtime = mtime
        self.operator = load_state(self.checkpoints.directory)
        op = self.operator
        if op.rollback_target is None or op.rollback_id <= self.rollback_id:
            return None
        return op.rollback_target, op.rollback_id

    def _roll_back(self, target: int, rollback_id: int) -> None:
        """Train on from version `target`'s weights and optimiser state (every process)."""
        self.rollback_id = rollback_id  # applied once, whatever comes of it
        try:
            # The live state as the target: restored arrays come laid out as the live ones.
            weights, opt_state, _ = self.checkpoints.restore(
                target, nnx.state(self.ac), self.opt_state
            )
        except Exception as e:
            log.error(
                "learner.rollback_unreadable", target=target, error=str(e), version=self.version
            )
            return
        self._set_from(weights, opt_state)
        self._based_on(target)
        self.metrics.rollbacks.inc()
        log.warning(
            "learner.rolled_back", target=target, version=self.version,
            next_version=self.version + 1, rollback_id=rollback_id,
        )  # fmt: skip

    @property
    def paused(self) -> bool:
        """Whether learning is paused now: by a server's operator or the persisted switch."""
        return self.servers.paused or self.operator.learning_paused

    def _paused(self) -> bool:
        """An operator paused learning on a server (`openpi-rl admin pause-learning`): no new
        update starts until it is resumed; the heartbeat's state says so. The persisted switch
        counts too: a pause holds while the server is down or restarting."""
        paused = self.paused
        if paused != (self.publisher.state == "paused"):
            self.publisher.set_state("paused" if paused else "waiting")
            log.info(
                "learner.paused" if paused else "learner.resumed_learning", version=self.version
            )
        return paused


__all__ = ["OperatorDecisions"]
