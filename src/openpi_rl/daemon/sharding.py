"""Where the learner's arrays lie on its 1-D device mesh (axis "data", every global device).

- The batch ([T, S, ...] leaves, boot_obs [S, ...]) is split along its segment axis S: each
  device holds S / devices columns, and each process feeds only the columns of its own devices
  (`process_columns`; with the mesh in `jax.devices()` order, process p of P holds the p-th
  contiguous block, columns [p S / P, (p + 1) S / P)).
- Parameters and optimizer state are sharded FSDP-style (ZeRO-3): each array with at least
  `min_size` elements is split along its largest dimension that the device count divides;
  the others (biases, scalars, Adam's step count) are replicated. Inside the jitted step XLA
  gathers a weight where it is used and reduce-scatters its gradient.
- Everything is a global `jax.Array` (`put_global`), even replicated: orbax saves only those
  from several processes, and a jitted step over every process's devices takes only those.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from openpi_rl.daemon.batch import ChunkBatch

AXIS = "data"


def leaf_spec(shape: tuple[int, ...], devices: int, min_size: int | None) -> PartitionSpec:
    """FSDP placement of one array of `shape` over `devices`: P(None, .., "data", ..) on its
    largest dimension divisible by `devices` (the first of equal ones); P() (replicated) when
    none is, when it has fewer than `min_size` elements, or when min_size is None."""
    if min_size is None or devices == 1 or math.prod(shape) < max(min_size, 1):
        return PartitionSpec()
    fits = [d for d, n in enumerate(shape) if n % devices == 0 and n >= devices]
    if not fits:
        return PartitionSpec()
    dim = max(fits, key=lambda d: (shape[d], -d))
    return PartitionSpec(*(AXIS if d == dim else None for d in range(len(shape))))


def state_shardings(mesh: Mesh, tree: Any, min_size: int | None) -> Any:
    """`tree` (arrays or ShapeDtypeStructs) with each leaf's NamedSharding (`leaf_spec`)."""
    return jax.tree.map(
        lambda x: NamedSharding(mesh, leaf_spec(tuple(np.shape(x)), mesh.size, min_size)), tree
    )


def replicated_shardings(mesh: Mesh, tree: Any) -> Any:
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), tree)


def put_global(tree: Any, shardings: Any) -> Any:
    """`tree`'s arrays as global arrays laid out as `shardings` (a tree of the same shape).
    Every process must pass the same values (built from the same seed, or restored from the
    same version); each places only the shards of its own devices. PRNG key arrays too."""
    return jax.tree.map(_put_leaf, tree, shardings)


def _put_leaf(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_leaf(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: a reshard
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def batch_shardings(mesh: Mesh, batch: ChunkBatch) -> ChunkBatch:
    """The ChunkBatch of shardings: [T, S, ...] leaves along S, boot_obs [S, ...] along S."""
    cols = NamedSharding(mesh, PartitionSpec(None, AXIS))
    rows = NamedSharding(mesh, PartitionSpec(AXIS))
    tree = jax.tree.map(lambda _: cols, batch._replace(boot_obs={}))
    return tree._replace(boot_obs=jax.tree.map(lambda _: rows, batch.boot_obs))


def process_columns(mesh: Mesh, num_segments: int) -> slice:
    """The columns s of a [T, S = num_segments] batch that this process feeds: those of its
    own devices, one contiguous block (process p of P: [p S / P, (p + 1) S / P) with the mesh
    in `jax.devices()` order)."""
    if num_segments % mesh.size:
        raise ValueError(
            f"batch segments: expected a multiple of the {mesh.size} devices, got {num_segments}"
        )
    rows = NamedSharding(mesh, PartitionSpec(AXIS))
    spans = sorted(
        (index[0].indices(num_segments)[:2])
        for index in rows.addressable_devices_indices_map((num_segments,)).values()
    )
    start, stop = spans[0][0], spans[-1][1]
    if any(a[1] != b[0] for a, b in itertools.pairwise(spans)):
        raise ValueError(f"this process's devices hold non-contiguous columns: {spans}")
    return slice(start, stop)


def put_batch(mesh: Mesh, local: ChunkBatch, num_segments: int) -> ChunkBatch:
    """A global ChunkBatch of `num_segments` columns from this process's share `local` (its
    `process_columns`: [T, S / P, ...] leaves, boot_obs [S / P, ...]; one process: the whole
    batch). Each process's columns go to its own devices, no copy between processes."""
    shardings = batch_shardings(mesh, local)

    def put(x: Any, sharding: NamedSharding, axis: int) -> jax.Array:
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        shape = (*x.shape[:axis], num_segments, *x.shape[axis + 1 :])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    rest = jax.tree.map(
        lambda x, s: put(x, s, 1), local._replace(boot_obs={}), shardings._replace(boot_obs={})
    )
    boot = jax.tree.map(lambda x, s: put(x, s, 0), local.boot_obs, shardings.boot_obs)
    return rest._replace(boot_obs=boot)


def share(batch: ChunkBatch, columns: slice) -> ChunkBatch:
    """The columns of a whole [T, S] batch that one process feeds (`process_columns`)."""
    rest = jax.tree.map(lambda x: x[:, columns], batch._replace(boot_obs={}))
    return rest._replace(boot_obs=jax.tree.map(lambda x: x[columns], batch.boot_obs))


def gather(tree: Any) -> Any:
    """`tree`'s global arrays as numpy arrays, whole, on every process (a collective: every
    process must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


__all__ = [
    "AXIS",
    "batch_shardings",
    "gather",
    "leaf_spec",
    "process_columns",
    "put_batch",
    "put_global",
    "replicated_shardings",
    "share",
    "state_shardings",
]
