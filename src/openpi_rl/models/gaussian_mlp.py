"""State-only Gaussian MLP policy: the baseline model for PPO correctness and for comparing with
Stable-Baselines3 (same network: tanh MLP, orthogonal init, state-independent log-std).

Observation: {"state": float32 [B, obs_dim]}. Actions: [B, H, D] with H = action_horizon, so
the same code path serves chunked policies; for a gym task H is 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from openpi_rl.rl.nn import MLP
from openpi_rl.rl.rl_api import Array, ArraySpec, Observation, ObsSpec

_LOG_2PI = math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class GaussianMLPConfig:
    """Builds a `GaussianMLP` (`GaussianMLPConfig(obs_dim=4, action_dim=1).create(rng)`)."""

    obs_dim: int = 4  # width of observation["state"] (`train` takes it from the environment)
    action_dim: int = 1  # numbers per action (`train` takes it from the environment)
    action_horizon: int = 1  # actions per chunk
    hidden: tuple[int, ...] = (64, 64)  # hidden widths of the mean's MLP
    log_std_init: float = 0.0  # initial log standard deviation of every action entry (learned)

    @property
    def obs_spec(self) -> ObsSpec:
        return {"state": ArraySpec((self.obs_dim,), "float32")}

    @property
    def value_in_dim(self) -> int:
        """Width of `value_features`: the critic reads the state, like SB3's separate critic."""
        return self.obs_dim

    KIND: ClassVar[str] = "gaussian_mlp"  # its name in config files and on the CLI
    normalized_actions = False  # actions are in env units (clipped to the env's bounds)

    def for_env(self, obs_dim: int, action_dim: int) -> GaussianMLPConfig:
        return dataclasses.replace(self, obs_dim=obs_dim, action_dim=action_dim)

    def create(self, rng: Array) -> GaussianMLP:
        return GaussianMLP(self, rngs=nnx.Rngs(rng))

    def fake_obs(self, batch: int = 1) -> dict[str, Array]:
        return {"state": jnp.zeros((batch, self.obs_dim), jnp.float32)}

    def fake_act(self, batch: int = 1) -> Array:
        return jnp.zeros((batch, self.action_horizon, self.action_dim), jnp.float32)


def diag_gaussian_logprob(x: Array, mean: Array, log_std: Array) -> Array:
    """Log-density of a diagonal Gaussian, summed over all axes after the first. x, mean: [B, ...]."""
    z = (x - mean) * jnp.exp(-log_std)
    per_dim = -0.5 * (z * z + _LOG_2PI) - log_std
    return per_dim.reshape(per_dim.shape[0], -1).sum(-1)


class GaussianMLP(nnx.Module):
    """Actions ~ N(mlp(state), exp(log_std)^2), one independent Gaussian per chunk entry."""

    def __init__(self, config: GaussianMLPConfig, *, rngs: nnx.Rngs):
        self.config = config
        out = config.action_horizon * config.action_dim
        self.mean_net = MLP((config.obs_dim, *config.hidden, out), 0.01, rngs)
        self.log_std = nnx.Param(
            jnp.full((config.action_horizon, config.action_dim), config.log_std_init, jnp.float32)
        )

    @property
    def obs_spec(self) -> ObsSpec:
        return self.config.obs_spec

    def _mean(self, obs: Observation) -> Array:
        state = jnp.asarray(obs["state"], jnp.float32)
        mean = self.mean_net(state)
        return mean.reshape(state.shape[0], self.config.action_horizon, self.config.action_dim)

    def mean(self, obs: Observation) -> Array:
        """The policy's mean action chunk [B, H, D]: its deterministic (greedy) action."""
        return self._mean(obs)

    def sample_actions(self, rng: Array, obs: Observation) -> Array:
        mean = self._mean(obs)
        return mean + jnp.exp(self.log_std[...]) * jax.random.normal(rng, mean.shape)

    def sample_with_logprobs(self, rng: Array, obs: Observation) -> tuple[Array, Array, Array]:
        """(actions [B, H, D], log-prob [B], policy actions) in one pass; for a continuous
        policy the policy actions are the actions themselves."""
        mean = self._mean(obs)
        actions = mean + jnp.exp(self.log_std[...]) * jax.random.normal(rng, mean.shape)
        return actions, diag_gaussian_logprob(actions, mean, self.log_std[...]), actions

    def policy_logprobs(self, rng: Array, obs: Observation, actions: Array) -> Array:
        return diag_gaussian_logprob(jnp.asarray(actions), self._mean(obs), self.log_std[...])

    def value_features(self, rng: Array, obs: Observation) -> Array:
        return jnp.asarray(obs["state"], jnp.float32)

    def entropy(self, rng: Array, obs: Observation) -> Array:
        batch = np.shape(obs["state"])[0]
        per_chunk = jnp.sum(self.log_std[...] + 0.5 * (_LOG_2PI + 1.0))
        return jnp.broadcast_to(per_chunk, (batch,))
