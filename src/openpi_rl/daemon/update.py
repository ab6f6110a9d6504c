"""The learner's jitted step, data-parallel over every device (all processes').

One pure function of (weights, optimizer state, batch): values of every observation with the
current critic, GAE over chunks, the library's fused PPO update (`rl.ppo.ppo_update`), then
what the publish guard needs: the KL between the policy before and after the update on the
batch, and whether everything came out finite. The batch is sharded along its segment axis
over a 1-D `jax.sharding.Mesh` of all devices, each minibatch along its sample axis; weights
and optimizer state are replicated or, past a size, sharded FSDP-style (sharding.py); XLA
reduces the gradients across devices.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from openpi_rl.daemon.batch import ChunkBatch, chunk_gae
from openpi_rl.daemon.sharding import (
    AXIS,
    process_columns,
    put_batch,
    put_global,
    replicated_shardings,
    share,
    state_shardings,
)
from openpi_rl.rl.ppo import PPOBatch, PPOConfig, masked_mean, ppo_update
from openpi_rl.rl.rl_api import Array


def learn_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    opt_state: optax.OptState,
    rng: Array,
    batch: ChunkBatch,
    config: PPOConfig,
    mesh: Mesh | None = None,
) -> tuple[nnx.State, optax.OptState, dict[str, Array]]:
    """Values -> GAE -> fused PPO update on one ChunkBatch. Returns new (params, opt_state) and
    metrics: PPO's, plus `update_kl` (k3 estimate of KL(before || after) on the policy's samples
    of the batch), `finite` (1 when loss, gradient norm and every new weight are finite),
    `behaviour_logp_gap` (mean |stored - current log-prob|) and means of reward, value and
    advantage over real steps.

    Intervened steps are left out of the ratio (policy_mask 0) and, with `config.bc_coef` > 0,
    their executed actions are cloned. Padding steps are out of everything.
    """
    t, s = batch.rewards.shape
    flat = lambda x: jnp.reshape(x, (t * s, *jnp.shape(x)[2:]))  # noqa: E731
    obs = {k: flat(v) for k, v in batch.obs.items()}
    actions = flat(batch.policy_actions)
    key_eval, key_update = jax.random.split(rng)

    ac = nnx.merge(graphdef, params, rest)
    logp_before, _, values = ac.evaluate(key_eval, obs, actions)
    boot_values = ac.value(key_eval, batch.boot_obs)
    adv, ret = chunk_gae(
        batch.rewards, values.reshape(t, s), boot_values, batch.dones, batch.ends, batch.valid,
        config.gamma, config.lam,
    )  # fmt: skip
    valid = flat(batch.valid).astype(jnp.float32)
    policy_mask = valid * (1.0 - flat(batch.intervened).astype(jnp.float32))
    use_bc = config.bc_coef > 0
    ppo_batch = PPOBatch(
        obs=obs,
        actions=actions,
        old_logp=flat(batch.logp),
        old_values=jnp.where(valid > 0, values, 0.0),
        advantages=flat(adv),
        returns=flat(ret),
        policy_mask=policy_mask,
        value_mask=valid,
        bc_actions=flat(batch.bc_actions) if use_bc else None,
        bc_mask=flat(batch.bc_mask).astype(jnp.float32) if use_bc else None,
    )
    constrain = None
    if mesh is not None and mesh.size > 1:
        rows = NamedSharding(mesh, PartitionSpec(AXIS))
        constrain = lambda mb: jax.tree.map(  # noqa: E731
            lambda a: jax.lax.with_sharding_constraint(a, rows), mb
        )
    new_params, new_opt_state, metrics = ppo_update(
        graphdef, params, rest, opt_state, key_update, ppo_batch, config, constrain
    )

    logp_after = nnx.merge(graphdef, new_params, rest).evaluate(key_eval, obs, actions)[0]
    d = jnp.where(policy_mask > 0, logp_after - logp_before, 0.0)
    metrics["update_kl"] = masked_mean(jnp.expm1(d) - d, policy_mask)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)]))
    for k in ("loss", "grad_norm", "update_kl"):
        finite = finite & jnp.isfinite(metrics[k])
    metrics["finite"] = finite.astype(jnp.float32)
    # How far the current policy is from the one that served the data (0 when the same
    # version served it: the stored log-prob and policy actions reproduce the ratio exactly).
    metrics["behaviour_logp_gap"] = masked_mean(
        jnp.abs(logp_before - flat(batch.logp)), policy_mask
    )
    metrics["reward_mean"] = masked_mean(flat(batch.rewards), valid)
    metrics["value_mean"] = masked_mean(values, valid)
    metrics["advantage_mean"] = masked_mean(flat(adv), valid)
    return new_params, new_opt_state, metrics


class DataParallel:
    """A 1-D mesh "data" over `devices` (default: every process's, `jax.devices()`) and the
    jitted `learn_step` on it (sharding.py): the batch split along its segments; parameters and
    optimizer state sharded FSDP-style, each array with at least `fsdp_min_size` elements split
    across the devices (None: all replicated, plain data parallelism). XLA gathers weights where
    they are used and reduces gradients across devices.

    With several processes (distributed.py) every process calls each method alike, with the
    same state and its own share of the batch (`share`); results are global arrays."""

    def __init__(
        self,
        config: PPOConfig,
        devices: Sequence[jax.Device] | None = None,
        fsdp_min_size: int | None = None,
    ):
        self.mesh = Mesh(np.array(list(devices or jax.devices())), (AXIS,))
        self.config = config
        self.fsdp_min_size = fsdp_min_size
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        if self.size > 1 and config.minibatch_size % self.size:
            raise ValueError(
                f"ppo.minibatch_size: expected a multiple of the {self.size} devices, "
                f"got {config.minibatch_size}"
            )
        # This process's devices in the mesh: its share of a batch is S x local / size columns.
        self.local_size = sum(
            d.process_index == jax.process_index() for d in self.mesh.devices.flat
        )

    @property
    def size(self) -> int:
        return self.mesh.size

    def put_replicated(self, tree: Any) -> Any:
        """`tree` whole on every device, as global arrays (every process passes the same)."""
        return put_global(tree, replicated_shardings(self.mesh, tree))

    def shardings(self, tree: Any) -> Any:
        """Where each parameter / optimizer-state array of `tree` lies (FSDP, `leaf_spec`)."""
        return state_shardings(self.mesh, tree, self.fsdp_min_size)

    def put_state(self, tree: Any) -> Any:
        """Parameters or optimizer state, sharded as `shardings` (every process passes the
        same values; each keeps its devices' shards)."""
        return put_global(tree, self.shardings(tree))

    def columns(self, num_segments: int) -> slice:
        """The columns of a [T, num_segments] batch this process feeds (all, alone)."""
        return process_columns(self.mesh, num_segments)

    def share(self, batch: ChunkBatch) -> ChunkBatch:
        """This process's share of a whole batch: its `columns`."""
        return share(batch, self.columns(batch.rewards.shape[1]))

    def put_batch(self, batch: ChunkBatch) -> ChunkBatch:
        """This process's share ([T, S_local, ...] leaves, boot_obs [S_local, ...]) as the
        global batch of S = S_local x size / local_size columns, sharded along S."""
        local = batch.rewards.shape[1]
        return put_batch(self.mesh, batch, local * self.size // self.local_size)

    def __call__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        rest: nnx.State,
        opt_state: optax.OptState,
        rng: Array,
        batch: ChunkBatch,
    ) -> tuple[nnx.State, optax.OptState, dict[str, Array]]:
        """`learn_step` on this process's share `batch` (one process: the whole batch). New
        params and opt_state come out laid out as `shardings`, metrics replicated."""
        layout = tuple(_flat(self.shardings(t)) for t in (params, opt_state))
        step = _jitted_learn_step(self.mesh, *layout)
        rng = self.put_replicated(rng)
        return step(
            graphdef, params, rest, opt_state, rng, self.put_batch(batch), self.config, self.mesh
        )


def _flat(tree: Any) -> tuple[Any, tuple[Any, ...]]:
    """A tree of shardings as a hashable (treedef, leaves)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


@functools.cache
def _jitted_learn_step(mesh: Mesh, params_layout: tuple, opt_layout: tuple) -> Any:
    """One jitted `learn_step` per mesh and state layout, shared by every learner on it (tests
    build many), so equal configs and shapes compile once."""
    out = tuple(jax.tree.unflatten(t, leaves) for t, leaves in (params_layout, opt_layout))
    return jax.jit(
        learn_step,
        static_argnames=("graphdef", "config", "mesh"),
        out_shardings=(*out, NamedSharding(mesh, PartitionSpec())),
    )
