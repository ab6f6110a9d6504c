"""The live policy: one immutable snapshot of weights plus its compiled sampler, held by a
single reference so a swap is one assignment between batches (guarantee 3)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
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
    `with_state` makes the next version's snapshot around the same jitted function: weights
    are an argument, so a version with the same shapes reuses the compiled executables and a
    hot-swap never compiles. `compilations` (shared by all versions) is for tests that check
    exactly that.
    """

    def __init__(self, version: int, ac: ActorCritic, obs_spec: ObsSpec, sizes: Sequence[int]):
        graphdef, state = nnx.split(ac)
        # A flat list of arrays crosses jit's C++ fast path; an nnx.State would be flattened
        # in Python on every request.
        leaves, treedef = jax.tree.flatten(state)
        # Committed arrays: a restored checkpoint's are, and jit keys its compiled executables on
        # that flag, so the first swap would otherwise compile again.
        leaves = [jax.device_put(x, x.sharding) for x in leaves]
        traces = [0]
        layouts: dict[tuple, list[tuple[tuple[int, ...], np.dtype]]] = {}

        def sample(leaves: list, key: jax.Array, counter: jax.Array, obs: dict) -> jax.Array:
            traces[0] += 1  # runs at trace time only
            ac = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            outs = ac.act(jax.random.fold_in(key, counter), obs)
            batch = next(iter(obs.values())).shape[0]
            layouts[(batch, tuple(sorted(obs)))] = [(o.shape, np.dtype(o.dtype)) for o in outs]
            return _pack(outs)

        self._init(version, obs_spec, tuple(sorted(sizes)), graphdef, treedef, leaves)
        self._sample, self._traces, self._layouts = jax.jit(sample), traces, layouts

    def _init(self, version, obs_spec, sizes, graphdef, treedef, leaves) -> None:
        self.version = version
        self.obs_spec = obs_spec
        self.sizes = sizes
        self.graphdef, self._treedef, self._leaves = graphdef, treedef, leaves
        self._key = jax.random.key(version)

    @property
    def compilations(self) -> int:
        """Executables compiled so far. jit's cache size counts what tracing alone misses: a
        re-compile for other argument shardings (committed or not) without a new trace."""
        cache_size = getattr(self._sample, "_cache_size", None)
        return max(self._traces[0], cache_size() if cache_size is not None else 0)

    @property
    def state(self) -> nnx.State:
        return jax.tree.unflatten(self._treedef, self._leaves)

    def with_state(self, version: int, state: nnx.State) -> PolicySnapshot:
        """The snapshot of `version` with weights `state` (e.g. `restore_version`'s), sharing
        this one's jitted sampler. Raises ValueError naming the first leaf whose structure,
        shape or dtype differs (a checkpoint of another model config)."""
        leaves, treedef = jax.tree.flatten(state)
        if treedef != self._treedef:
            raise ValueError(f"version {version}: weights tree differs from the served model's")
        return self.with_leaves(version, leaves)

    def with_leaves(self, version: int, leaves: Sequence[jax.Array | np.ndarray]) -> PolicySnapshot:
        """`with_state` for the flat leaves of a state (`jax.tree.leaves` order), e.g. the
        numpy arrays a restore worker sends. Same checks: ValueError on another count, shape or
        dtype. Each leaf goes onto the live leaf's device (committed: no re-compile)."""
        if len(leaves) != len(self._leaves):
            raise ValueError(
                f"version {version}: {len(leaves)} weight arrays, the served model has "
                f"{len(self._leaves)}"
            )
        return self.with_changed(version, dict(enumerate(leaves)))

    def with_changed(
        self, version: int, changed: Mapping[int, jax.Array | np.ndarray]
    ) -> PolicySnapshot:
        """The snapshot of `version` whose leaves `changed` ({index in `jax.tree.leaves`
        order: array}, e.g. a LoRA version's delta) replace this one's; every other leaf is
        this snapshot's array itself, shared, not copied (a frozen base moves nowhere).
        ValueError on an index out of range or another shape or dtype."""
        leaves = list(self._leaves)
        for i, new in changed.items():
            if not 0 <= i < len(leaves):
                raise ValueError(
                    f"version {version}: leaf {i}: the served model has {len(leaves)} arrays"
                )
            old = leaves[i]
            if new.shape != old.shape or new.dtype != old.dtype:
                raise ValueError(
                    f"version {version}: leaf {i}: expected {old.dtype} {list(old.shape)}, "
                    f"got {new.dtype} {list(new.shape)}"
                )
            leaves[i] = jax.device_put(new, old.sharding)
        other = object.__new__(PolicySnapshot)
        other._init(version, self.obs_spec, self.sizes, self.graphdef, self._treedef, leaves)
        other._sample, other._traces, other._layouts = self._sample, self._traces, self._layouts
        return other

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
            first = np.asarray(observations[0][k])
            stacked = _input_buffer(k, (size, *first.shape), first.dtype)
            for i, o in enumerate(observations):
                stacked[i] = o[k]
            stacked[n:] = first  # padding: any valid input will do
            batch[k] = stacked
        packed = np.asarray(self._sample(self._leaves, self._key, np.uint32(counter), batch))
        layout = self._layouts[(size, tuple(sorted(batch)))]
        actions, logp, value, policy = _unpack(packed, layout)
        return Sampled(actions[:n], logp[:n], value[:n], policy[:n])

    def warm_up(
        self, example: Mapping[str, np.ndarray], key_sets: Sequence[tuple[str, ...]] = ()
    ) -> bool:
        """Run every padded size once (for the full key set and each listed subset of optional
        keys): the first snapshot compiles here, before the server reports ready; a swapped-in
        version checks its weights here, off the serving path. True if every output is finite."""
        finite = True
        for keys in [tuple(example), *key_sets]:
            obs = {k: np.asarray(example[k]) for k in keys}
            for size in self.sizes:
                out = self.sample(0, [obs] * size)
                finite &= _finite(out)
        return bool(finite)

    def check(self, example: Mapping[str, np.ndarray]) -> bool:
        """One call at the smallest padded size: True if the outputs are finite. Enough for a
        swapped-in version once `warm_up` has compiled every size (versions share the jitted
        sampler, so the weights are all that changed); `compilations` tells if it compiled."""
        out = self.sample(0, [{k: np.asarray(v) for k, v in example.items()}] * self.sizes[0])
        return _finite(out)


# Host <-> device on CPU, measured per call (noop model, 2 x 150 KB images, after 0.5 ms idle
# as between a robot's requests): inputs on 64-byte boundaries are used in place, where
# numpy's default alignment costs a copy (-30 us); one packed output is one transfer where
# four small outputs were four (-50 us).
_ALIGN = 64
_BUFFERS = threading.local()  # per thread: the serving thread and a swapper's check never share


def _input_buffer(key: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A 64-byte aligned batch buffer for observation `key`, reused call after call: a fresh
    300 KB buffer costs its page faults each time (~40 us). Safe to refill once `sample` has
    the outputs: the computation that read it has finished."""
    pool = _BUFFERS.__dict__.setdefault("pool", {})
    dtype = np.dtype(dtype)
    buf = pool.get((key, shape, dtype))
    if buf is None:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        raw = np.empty(nbytes + _ALIGN, np.uint8)
        start = -raw.ctypes.data % _ALIGN
        buf = pool[(key, shape, dtype)] = raw[start : start + nbytes].view(dtype).reshape(shape)
    return buf


def _pack(outs: Sequence[jax.Array]) -> jax.Array:
    """Outputs as one uint8 vector, each padded to 8 bytes (so every view is aligned)."""
    parts = []
    for o in outs:
        o = o.astype(jnp.uint8) if o.dtype == jnp.bool_ else o
        b = o.reshape(-1) if o.dtype.itemsize == 1 else o
        b = jax.lax.bitcast_convert_type(b, jnp.uint8).reshape(-1)
        parts += [b, jnp.zeros(-b.size % 8, jnp.uint8)]
    return jnp.concatenate(parts)


def _unpack(packed: np.ndarray, layout: Sequence[tuple[tuple[int, ...], np.dtype]]) -> list:
    """`_pack`'s inverse on the host: views of `packed`, no copies."""
    out, at = [], 0
    for shape, dtype in layout:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        out.append(packed[at : at + nbytes].view(dtype).reshape(shape))
        at += nbytes + (-nbytes % 8)
    return out


def _finite(out: Sampled) -> bool:
    return bool(all(np.isfinite(x).all() for x in (out.actions, out.logp, out.value)))


def all_finite(arrays: Iterable[jax.Array | np.ndarray]) -> bool:
    """True when no array holds NaN or inf (numpy or host jax arrays; bf16 included; key
    arrays, which have no numbers, are skipped)."""
    return all(
        bool(np.isfinite(np.asarray(x)).all())
        for x in arrays
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    )


def example_observation(obs_spec: ObsSpec) -> dict[str, np.ndarray]:
    """A zero observation (unbatched) of every key in the spec."""
    return {k: np.zeros(s.shape, np.dtype(s.dtype)) for k, s in obs_spec.items()}


__all__ = ["PolicySnapshot", "Sampled", "all_finite", "example_observation", "padded_sizes"]


def key_sets(
    obs_spec: ObsSpec, model: object, extra: Sequence[Sequence[str]] = ()
) -> tuple[tuple[str, ...], ...]:
    """Observation key sets a server compiles before ready: all keys, the required ones, those
    the model config names as what robots send (`serving_key_sets`), and `extra` (the
    server's `warm_key_sets`). A request with another set compiles on the serving path once
    (logged). Each set in spec order, no duplicates; an unknown key is a ValueError."""
    sets = [tuple(obs_spec), tuple(k for k, s in obs_spec.items() if not s.optional)]
    sets += getattr(getattr(model, "config", None), "serving_key_sets", ())
    sets += [tuple(k) for k in extra]
    out: dict[tuple[str, ...], None] = {}
    for keys in sets:
        unknown = set(keys) - set(obs_spec)
        if unknown:
            raise ValueError(f"warm_key_sets: {sorted(unknown)} not in the model's obs_spec")
        out[tuple(k for k in obs_spec if k in keys)] = None
    return tuple(out)
