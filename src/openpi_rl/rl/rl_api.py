"""The interface a model implements to be trained by PPO and served by the policy server.

A model is an `nnx.Module` with four methods of (rng, obs, ...) and an `obs_spec`. Batch axis
first everywhere: an observation is a dict of arrays [B, ...], actions are [B, H, D]
(H = action horizon, the chunk a robot plays per request; D = action dimension).

Two optional methods let a model do better than the four required ones:
- `sample_with_logprobs(rng, obs) -> (actions [B, H, D], logp [B], policy_actions)`: the
  log-prob known while sampling, and the *policy actions* to store for an exact PPO ratio
  (a token policy's sampled tokens, which the continuous actions do not determine; a
  continuous policy returns its actions again). `policy_logprobs` accepts either form.
- `evaluate_actions(rng, obs, policy_actions) -> (logp [B], entropy [B], features [B, F])`:
  everything the PPO loss needs from one forward pass.

`validate_observation` is the one place an observation is checked against a spec: the
trainer, the policy server and the tests all call it, so they reject the same inputs with
the same message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

Array = jax.Array
Observation = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Shape (without the batch axis) and dtype of one observation entry.

    `optional` entries (an image or prompt a state-only task does not send) may be absent.
    """

    shape: tuple[int, ...]
    dtype: str
    optional: bool = False

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)}"


ObsSpec = Mapping[str, ArraySpec]


@runtime_checkable
class RLModel(Protocol):
    """What PPO and the policy server need from a policy.

    All methods take a PRNG key first so stochastic models (dropout, sampling) stay pure.
    """

    @property
    def obs_spec(self) -> ObsSpec:
        """Keys, per-example shapes and dtypes an observation must have."""
        ...

    def sample_actions(self, rng: Array, obs: Observation) -> Array:
        """Sample an action chunk per example: [B, H, D]."""
        ...

    def policy_logprobs(self, rng: Array, obs: Observation, actions: Array) -> Array:
        """Log-probability of each chunk under the policy: [B]."""
        ...

    def value_features(self, rng: Array, obs: Observation) -> Array:
        """Features the critic's value head reads: [B, F]."""
        ...

    def entropy(self, rng: Array, obs: Observation) -> Array:
        """Policy entropy per example: [B]."""
        ...


def validate_observation(obs: Observation, spec: ObsSpec, *, batched: bool = True) -> int | None:
    """Check `obs` against `spec`; raise ValueError naming the key, the expected spec and what came.

    With `batched`, every entry has a leading batch axis and all batch sizes must agree; the
    batch size is returned (None when unbatched). Unknown keys are refused too: a typo in a
    key name would otherwise silently drop that input. Floating-point entries must be finite.
    """
    if not isinstance(obs, Mapping):
        raise ValueError(f"observation: expected a dict of arrays, got {type(obs).__name__}")
    unknown = sorted(set(obs) - set(spec))
    if unknown:
        raise ValueError(f"observation: unexpected key(s) {unknown}; expected keys {sorted(spec)}")
    batch: int | None = None
    for key, s in spec.items():
        if key not in obs:
            if s.optional:
                continue
            raise ValueError(f"observation[{key!r}]: missing; expected {s.describe()}")
        value = obs[key]
        if isinstance(value, np.ndarray):  # the server's case, per request: the short path
            shape, dtype = value.shape, value.dtype
        else:  # jax arrays stay where they are; lists and scalars are converted
            shape = tuple(np.shape(value))
            dtype = np.dtype(getattr(value, "dtype", None) or np.asarray(value).dtype)
        lead = shape[:1] if batched else ()
        if (
            dtype != s.dtype
            or shape[len(lead) :] != tuple(s.shape)
            or len(shape) != len(s.shape) + len(lead)
        ):
            expect = f"{s.dtype} {['B', *s.shape] if batched else list(s.shape)}"
            got = f"{dtype.name} {list(shape)}"
            raise ValueError(f"observation[{key!r}]: expected {expect}, got {got}")
        if batched:
            if batch is not None and shape[0] != batch:
                raise ValueError(
                    f"observation[{key!r}]: batch size {shape[0]} differs from {batch} "
                    "of the other entries"
                )
            batch = shape[0]
        if dtype.kind == "f" and not np.isfinite(np.asarray(value)).all():
            raise ValueError(f"observation[{key!r}]: contains NaN or inf")
    return batch
