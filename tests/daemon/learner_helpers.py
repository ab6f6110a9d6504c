"""A real replay written the way the policy server writes it: a `ReplayWriter`, observations
msgpack-encoded as the robot's request, actions / log-probs / values from a real ActorCritic."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from openpi_rl.daemon import LearnerConfig
from openpi_rl.models import GaussianMLPConfig
from openpi_rl.models.choice import build_actor_critic
from openpi_rl.replay import ReplayConfig, records
from openpi_rl.rl import PPOConfig
from openpi_rl.weights import restore_version

MODEL = GaussianMLPConfig(obs_dim=3, action_dim=2, action_horizon=2, hidden=(16, 16))


def learner_config(tmp_path, **overrides) -> LearnerConfig:
    """A small learner on tmp_path: no metrics port, a free PUB port, no settling delay."""
    base = LearnerConfig(
        model=MODEL,
        value_hidden=(16, 16),
        replay_dir=str(tmp_path / "replay"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        ppo=PPOConfig(lr=1e-3, train_iters=2, minibatch_size=16, bc_coef=1.0),
        segment_length=8,
        batch_segments=8,
        min_transitions=1,
        settle_s=0.0,
        publish_endpoint="tcp://127.0.0.1:*",
        metrics_port=None,
    )
    return dataclasses.replace(base, **overrides)


class Recorder:
    """Serves chunks from an ActorCritic and records them as the policy server does."""

    def __init__(self, root, ac=None, seed: int = 0):
        self.location = str(root)  # a directory or a postgresql:// URL
        self.writer = ReplayConfig(path=root, commit_interval_s=0.01).create()
        self.ac = ac if ac is not None else build_actor_critic(MODEL, (16, 16), 0)
        self.key = jax.random.key(seed)
        self.count = 0
        graphdef = nnx.graphdef(self.ac)
        self._act = jax.jit(lambda state, key, obs: nnx.merge(graphdef, state).act(key, obs))

    def serve(
        self, robot: str, episode: str, step: int, obs: dict, version: int = 0
    ) -> tuple[int, np.ndarray]:
        self.count += 1
        batched = {k: np.asarray(v)[None] for k, v in obs.items()}
        out = self._act(nnx.state(self.ac), jax.random.fold_in(self.key, self.count), batched)
        actions, logp, value, policy_actions = (np.asarray(x)[0] for x in out)
        payload = records.encode_observation(obs)
        tid = self.writer.append_transition(
            robot, episode, step, version, payload, actions, policy_actions, float(logp),
            float(value), t_mono=float(self.count),
        )  # fmt: skip
        return tid, actions

    def episode(
        self,
        robot: str,
        episode: str,
        n: int,
        rng: np.random.Generator,
        version: int = 0,
        end: str | None = "done",
        reward: float = 0.1,
    ) -> list[int]:
        """n chunks with reward `reward` each; the last is done / truncated / open (None)."""
        ids = []
        for t in range(n):
            obs = {"state": rng.standard_normal(MODEL.obs_dim).astype(np.float32)}
            tid, _ = self.serve(robot, episode, t, obs, version)
            last = t == n - 1
            self.writer.report(
                tid, reward, done=last and end == "done", truncated=last and end == "truncated"
            )
            ids.append(tid)
        return ids

    def close(self) -> None:
        self.writer.close()


def versions_diff(a: Path, b: Path, model: GaussianMLPConfig = MODEL) -> float:
    """The largest absolute difference between two saved versions' arrays."""
    fresh = build_actor_critic(model, (16, 16), 0)
    got, want = (jax.tree.leaves(restore_version(p, fresh)) for p in (a, b))
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(got, want, strict=True)
    )
