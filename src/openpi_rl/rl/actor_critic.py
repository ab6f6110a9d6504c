"""Actor-critic: any `RLModel` as the actor plus a value head on its `value_features`.

    obs -> model -> actions / log-probs            (actor)
            `-> value_features [B, F] -> head -> value [B]   (critic)

The value head is any `nnx.Module` mapping [B, F] to [B]; `ValueHead` is the default MLP.
"""

from __future__ import annotations

from flax import nnx

from openpi_rl.rl.nn import MLP
from openpi_rl.rl.rl_api import Array, Observation, RLModel


class ValueHead(nnx.Module):
    """MLP from features [B, F] to values [B] (tanh hidden layers, orthogonal init with gain 1
    on the output, as CleanRL and SB3 do for the critic)."""

    def __init__(
        self, in_dim: int, rngs: nnx.Rngs | None = None, hidden: tuple[int, ...] = (256, 256)
    ):
        self.mlp = MLP((in_dim, *hidden, 1), 1.0, rngs if rngs is not None else nnx.Rngs(0))

    def __call__(self, x: Array) -> Array:
        return self.mlp(x)[..., 0]


class ActorCritic(nnx.Module):
    """`ActorCritic(model, value_in_dim=1024)`: the actor is `model`, the critic a value head.

    value_in_dim: width of `model.value_features`. value_head: any module [B, F] -> [B]
    (default `ValueHead(value_in_dim, hidden=value_hidden)`).
    """

    def __init__(
        self,
        model: RLModel,
        value_in_dim: int,
        value_head: nnx.Module | None = None,
        *,
        value_hidden: tuple[int, ...] = (256, 256),
        rngs: nnx.Rngs | None = None,
    ):
        self.model = model
        self.value_in_dim = value_in_dim
        if value_head is None:
            value_head = ValueHead(
                value_in_dim, rngs if rngs is not None else nnx.Rngs(0), value_hidden
            )
        self.value_head = value_head

    def value(self, rng: Array, obs: Observation) -> Array:
        """Critic's estimate per example: [B]."""
        return self._head(self.model.value_features(rng, obs))

    def _head(self, features: Array) -> Array:
        if features.shape[-1] != self.value_in_dim:
            raise ValueError(
                f"value_features: expected width value_in_dim={self.value_in_dim}, "
                f"got {features.shape[-1]}"
            )
        return self.value_head(features)

    def evaluate(
        self, rng: Array, obs: Observation, policy_actions: Array
    ) -> tuple[Array, Array, Array]:
        """(log-prob [B], entropy [B], value [B]) of stored policy actions: what PPO needs.

        A model with `evaluate_actions` gives all three from one forward pass (a token
        policy's teacher-forced pass also yields the prefix features the critic reads).
        """
        fused = getattr(self.model, "evaluate_actions", None)
        if fused is not None:
            logp, entropy, features = fused(rng, obs, policy_actions)
            return logp, entropy, self._head(features)
        logp = self.model.policy_logprobs(rng, obs, policy_actions)
        return logp, self.model.entropy(rng, obs), self.value(rng, obs)

    def act(self, rng: Array, obs: Observation) -> tuple[Array, Array, Array, Array]:
        """Sample for a rollout or a robot: (actions [B, H, D], behaviour log-prob [B],
        value [B], policy actions). Store the policy actions: `evaluate` needs them for an
        exact ratio (a token policy's sampled tokens; a continuous policy's actions).
        """
        fused = getattr(self.model, "sample_with_logprobs", None)
        if fused is not None:
            actions, logp, policy_actions = fused(rng, obs)
        else:
            actions = policy_actions = self.model.sample_actions(rng, obs)
            logp = self.model.policy_logprobs(rng, obs, actions)
        return actions, logp, self.value(rng, obs), policy_actions
