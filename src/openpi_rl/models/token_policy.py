"""The RL API of an autoregressive token policy, written once (`pi0_fast`, `pi0_fast_openpi`).

A token policy samples a chunk of token ids, decodes them into actions, and scores ids by one
teacher-forced pass. Subclasses provide the four model-specific steps; this mixin turns them
into `sample_actions`, `sample_with_logprobs`, `policy_logprobs`, `evaluate_actions` and
`entropy`. Tokens up to and including the first end token count; what follows is padding.
"""

from __future__ import annotations

import jax.numpy as jnp

from openpi_rl.rl.rl_api import Array, Observation


class TokenPolicy:
    """Mixin for an `nnx.Module`. Hooks (batch axis first):

    - `_decode(rng, obs) -> {"ids": [B, T] int32, "logp": [B], "entropy": [B], ...}`
    - `_to_actions(ids [B, T]) -> actions [B, H, D]`
    - `_as_ids(actions) -> ids [B, T]` (ids pass through; continuous actions are encoded)
    - `_token_logps(obs, ids) -> (tok_logp [B, T], live [B, T] bool, entropy [B, T],
      value features [B, F])`
    """

    def to_actions(self, ids: Array) -> Array:
        """Token ids [B, T] -> actions [B, H, D], as `sample_actions` decodes what it samples."""
        return self._to_actions(ids)

    def sample_actions(self, rng: Array, obs: Observation) -> Array:
        return self._to_actions(self._decode(rng, obs)["ids"])

    def sample_with_logprobs(self, rng: Array, obs: Observation) -> tuple[Array, Array, Array]:
        """(actions, behaviour log-prob of the sampled ids, the ids): what the server stores."""
        out = self._decode(rng, obs)
        return self._to_actions(out["ids"]), out["logp"], out["ids"]

    def policy_logprobs(self, rng: Array, obs: Observation, actions: Array) -> Array:
        tok_logp, live, _, _ = self._token_logps(obs, self._as_ids(actions))
        return jnp.sum(jnp.where(live, tok_logp, 0.0), 1)

    def evaluate_actions(
        self, rng: Array, obs: Observation, actions: Array
    ) -> tuple[Array, Array, Array]:
        """(log-prob [B], mean per-token entropy [B], value features [B, F]) in one pass."""
        tok_logp, live, ent, features = self._token_logps(obs, self._as_ids(actions))
        count = jnp.maximum(live.sum(1), 1)
        return (
            jnp.sum(jnp.where(live, tok_logp, 0.0), 1),
            jnp.sum(jnp.where(live, ent, 0.0), 1) / count,
            features,
        )

    def entropy(self, rng: Array, obs: Observation) -> Array:
        """Mean per-token entropy along a chunk sampled with `rng`."""
        return self._decode(rng, obs)["entropy"]
