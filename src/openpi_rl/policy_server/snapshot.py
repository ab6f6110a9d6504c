"""The live policy: one immutable snapshot of weights plus its compiled sampler, held by a
single reference so a swap is one assignment between batches (guarantee 3)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from openpi_rl.rl.actor_critic import ActorCritic
from openpi_rl.rl.rl_api import ObsSpec


def padded_sizes(max_batch: int) -> tuple[int, ...]:
    """Batch sizes the server compiles for: powers of two up to max_batch (and max_batch)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


@dataclasses.dataclass
class Sampled:
    """Host-side result for a batch of B requests."""

    actions: np.ndarray  # [B, H, D] float32
    logp: np.ndarray  # [B]
    value: np.ndarray  # [B]
    policy_actions: np.ndarray  # [B, ...] what the learner's ratio needs (tokens or actions)


class PolicySnapshot:
    """(version, graphdef, state) and a pure `jax.jit` sampler over them.

    Requests are padded to the next size in `sizes`, so after `warm_up` no request compiles.
    `compilations` counts traces, for tests that check exactly that.
    """

    def __init__(self, version: int, ac: ActorCritic, obs_spec: ObsSpec, sizes: Sequence[int]):
        self.version = version
        self.obs_spec = obs_spec
        self.sizes = tuple(sorted(sizes))
        self.graphdef, self.state = nnx.split(ac)
        # A flat list of arrays crosses jit's C++ fast path; an nnx.State would be flattened
        # in Python on every request.
        self._leaves, treedef = jax.tree.flatten(self.state)
        self._key = jax.random.key(version)
        self.compilations = 0
        graphdef = self.graphdef

        def sample(leaves: list, key: jax.Array, counter: jax.Array, obs: dict) -> tuple:
            self.compilations += 1  # runs at trace time only
            ac = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            return ac.act(jax.random.fold_in(key, counter), obs)

        self._sample = jax.jit(sample)

    def pad_to(self, n: int) -> int:
        for size in self.sizes:
            if size >= n:
                return size
        raise ValueError(f"batch of {n} exceeds max_batch {self.sizes[-1]}")

    def sample(self, counter: int, observations: Sequence[Mapping[str, np.ndarray]]) -> Sampled:
        """One batched call for a list of unbatched observations with the same keys; the
        sampling key is derived from (version, counter)."""
        n = len(observations)
        size = self.pad_to(n)
        batch = {}
        for k in observations[0]:
            stacked = np.stack([o[k] for o in observations])
            if size > n:  # pad by repeating the first row: any valid input will do
                stacked = np.concatenate([stacked, np.repeat(stacked[:1], size - n, 0)])
            batch[k] = stacked
        out = self._sample(self._leaves, self._key, np.uint32(counter), batch)
        actions, logp, value, policy = jax.device_get(out)
        return Sampled(actions[:n], logp[:n], value[:n], policy[:n])

    def warm_up(
        self, example: Mapping[str, np.ndarray], key_sets: Sequence[tuple[str, ...]] = ()
    ) -> None:
        """Compile every padded size (for the full key set and each listed subset of optional
        keys) before the server reports ready."""
        for keys in [tuple(example), *key_sets]:
            obs = {k: np.asarray(example[k]) for k in keys}
            for size in self.sizes:
                self.sample(0, [obs] * size)


def example_observation(obs_spec: ObsSpec) -> dict[str, np.ndarray]:
    """A zero observation (unbatched) of every key in the spec."""
    return {k: np.zeros(s.shape, np.dtype(s.dtype)) for k, s in obs_spec.items()}


__all__ = ["PolicySnapshot", "Sampled", "example_observation", "padded_sizes"]
