"""The learner's jitted step, data-parallel over the local devices.

One pure function of (weights, optimizer state, batch): values of every observation with the
current critic, GAE over chunks, the library's fused PPO update (`rl.ppo.ppo_update`), then
what the publish guard needs: the KL between the policy before and after the update on the
batch, and whether everything came out finite. The batch is sharded along its segment axis
over a 1-D `jax.sharding.Mesh` of all local devices, each minibatch along its sample axis;
weights and optimizer state are replicated, so XLA all-reduces the gradients.
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
        rows = NamedSharding(mesh, PartitionSpec("data"))
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
    """A 1-D mesh over `devices` (default: all local ones) and the jitted `learn_step` on it."""

    def __init__(self, config: PPOConfig, devices: Sequence[jax.Device] | None = None):
        self.mesh = Mesh(np.array(list(devices or jax.local_devices())), ("data",))
        self.config = config
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        if self.size > 1 and config.minibatch_size % self.size:
            raise ValueError(
                f"ppo.minibatch_size: expected a multiple of the {self.size} devices, "
                f"got {config.minibatch_size}"
            )
        self._step = _jitted_learn_step(self.mesh)

    @property
    def size(self) -> int:
        return self.mesh.size

    def put_replicated(self, tree: Any) -> Any:
        return jax.device_put(tree, self.replicated)

    def put_batch(self, batch: ChunkBatch) -> ChunkBatch:
        """Shard [T, S, ...] leaves along S and boot_obs [S, ...] along S."""
        cols = NamedSharding(self.mesh, PartitionSpec(None, "data"))
        rows = NamedSharding(self.mesh, PartitionSpec("data"))
        boot = jax.device_put(batch.boot_obs, rows)
        rest = jax.device_put(batch._replace(boot_obs={}), cols)
        return rest._replace(boot_obs=boot)

    def __call__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        rest: nnx.State,
        opt_state: optax.OptState,
        rng: Array,
        batch: ChunkBatch,
    ) -> tuple[nnx.State, optax.OptState, dict[str, Array]]:
        return self._step(
            graphdef, params, rest, opt_state, rng, self.put_batch(batch), self.config, self.mesh
        )


@functools.cache
def _jitted_learn_step(mesh: Mesh) -> Any:
    """One jitted `learn_step` per mesh, shared by every learner on it (tests build many), so
    equal configs and shapes compile once. Weights and optimizer state come out replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        learn_step,
        static_argnames=("graphdef", "config", "mesh"),
        out_shardings=(replicated, replicated, None),
    )
