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
        features = self.model.value_features(rng, obs)
        if features.shape[-1] != self.value_in_dim:
            raise ValueError(
                f"value_features: expected width value_in_dim={self.value_in_dim}, "
                f"got {features.shape[-1]}"
            )
        return self.value_head(features)

    def evaluate(self, rng: Array, obs: Observation, actions: Array) -> tuple[Array, Array, Array]:
        """(log-prob [B], entropy [B], value [B]) of `actions`: everything the PPO loss needs."""
        logp = self.model.policy_logprobs(rng, obs, actions)
        entropy = self.model.entropy(rng, obs)
        return logp, entropy, self.value(rng, obs)

    def act(self, rng: Array, obs: Observation) -> tuple[Array, Array, Array]:
        """Sample for a rollout or a robot: (actions [B, H, D], behaviour log-prob [B], value [B]).

        Uses the model's fused `sample_actions_and_logprobs` when it has one (a token policy
        knows its log-prob while decoding); otherwise scores the sample with `policy_logprobs`.
        """
        fused = getattr(self.model, "sample_actions_and_logprobs", None)
        if fused is not None:
            actions, logp = fused(rng, obs)
        else:
            actions = self.model.sample_actions(rng, obs)
            logp = self.model.policy_logprobs(rng, obs, actions)
        return actions, logp, self.value(rng, obs)
