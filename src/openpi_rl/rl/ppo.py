"""PPO: GAE, the clipped loss, and the fused update (epochs x minibatches in one jitted call).

Pure functions of arrays; the only state is the (params, optimizer state) pair `PPOTrainer`
carries. Read top to bottom like CleanRL's ppo_continuous_action.py; the update is fused like
PureJaxRL's (`lax.scan` over epochs and minibatches, no Python loop on the hot path).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from openpi_rl.rl.actor_critic import ActorCritic
from openpi_rl.rl.rl_api import Array, Observation, validate_observation


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters. The first eight fields and their defaults are the seed's."""

    clip_ratio: float = 0.2  # epsilon of the clipped surrogate: ratios outside 1 ± this stop
    value_coef: float = 0.5  # weight of the value loss in the total loss
    entropy_coef: float = 0.01  # weight of the entropy bonus (subtracted from the loss)
    gamma: float = 0.99  # discount per step
    lam: float = 0.95  # GAE's lambda: 0 one-step TD, 1 Monte Carlo
    lr: float = 5e-5  # Adam's learning rate
    train_iters: int = 4  # epochs over the batch per update
    minibatch_size: int = 64  # transitions per gradient step
    max_grad_norm: float | None = 0.5  # global-norm gradient clipping; None turns it off
    target_kl: float | None = None  # stop the update once approx KL passes 1.5x this (SB3's rule)
    normalize_advantages: bool = True  # per minibatch, as SB3 and CleanRL do
    clip_value: bool = False  # clip the value change to +-value_clip_range (CleanRL's clip_vloss)
    value_clip_range: float = 0.2  # how far clip_value lets the value move from the old one
    adam_eps: float = 1e-5  # SB3 / CleanRL value, not optax's 1e-8
    bc_coef: float = 0.0  # weight of the behaviour-cloning term on `PPOBatch.bc_actions` (0: off)


# ----------------------------------------------------------------------------- advantages


def gae_advantages(
    rewards: Array,
    values: Array,
    dones: Array,
    truncated: Array | None,
    last_values: Array,
    gamma: float,
    lam: float,
    final_values: Array | None = None,
) -> tuple[Array, Array]:
    """Generalised advantage estimates (Schulman et al. 2016), computed backwards with lax.scan.

    rewards, values, dones, truncated: [T, B] (time first, then environments). values[t] is
    V(s_t). last_values: [B], the value of the observation after step T-1. dones[t] marks a
    terminal step: no bootstrap. truncated[t] marks a time-limit cut: the episode ends for the
    recursion but step t bootstraps from final_values[t] [T, B], the value of the final
    observation the environment returned (the next row of `values` already belongs to the
    next episode after an auto-reset). Returns (advantages [T, B], returns [T, B]).
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    dones = jnp.asarray(dones, jnp.float32)
    if truncated is None:
        truncated = jnp.zeros_like(dones)
        final_values = jnp.zeros_like(values)
    elif final_values is None:
        raise ValueError("gae_advantages: `truncated` given without `final_values` to bootstrap")
    truncated = jnp.asarray(truncated, jnp.float32) * (1.0 - dones)  # terminal wins if both
    next_values = jnp.concatenate([values[1:], jnp.asarray(last_values, jnp.float32)[None]], 0)
    # The value that follows step t: the episode's final observation when cut by a time limit.
    next_values = jnp.where(truncated > 0, jnp.asarray(final_values, jnp.float32), next_values)
    deltas = rewards + gamma * next_values * (1.0 - dones) - values
    decay = gamma * lam * (1.0 - jnp.maximum(dones, truncated))  # 0 where an episode ends
    _, advantages = jax.lax.scan(
        _gae_step, jnp.zeros_like(deltas[0]), (deltas, decay), reverse=True
    )
    return advantages, advantages + values


def _gae_step(carry: Array, x: tuple[Array, Array]) -> tuple[Array, Array]:
    """One step back: A_t = delta_t + gamma * lam * (1 - end_t) * A_{t+1}. Module level, so an
    eager call's scan is traced and compiled once per shape, not once per call."""
    delta, decay = x
    adv = delta + decay * carry
    return adv, adv


# ----------------------------------------------------------------------------- loss


class PPOBatch(NamedTuple):
    """Flat training batch; every leaf has the sample axis N first."""

    obs: Observation  # dict of [N, ...]
    actions: Array  # [N, H, D]
    old_logp: Array  # [N] behaviour log-prob stored when the action was sampled
    old_values: Array  # [N] critic's value at sampling time
    advantages: Array  # [N]
    returns: Array  # [N] advantages + old_values: the critic's regression target
    # Optional masks (None: every sample counts). Padding has both masks 0; a transition an
    # operator took over has policy_mask 0 (its behaviour log-prob is not the policy's).
    policy_mask: Array | None = None  # [N] 1: in the clipped surrogate, approx KL, clip fraction
    value_mask: Array | None = None  # [N] 1: a real sample (value loss, entropy, BC normaliser)
    bc_actions: Array | None = None  # [N, H, D] actions an operator executed (teleop)
    bc_mask: Array | None = None  # [N] 1: bc_actions[i] is trained by behaviour cloning


def masked_mean(x: Array, mask: Array | None) -> Array:
    """Mean of x [N] over mask [N] (all of x when mask is None); 0 when the mask is empty."""
    if mask is None:
        return x.mean()
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def explained_variance(predicted: Array, target: Array, mask: Array | None = None) -> Array:
    """1 - Var[target - predicted] / Var[target]; 1 is perfect, 0 is no better than the mean."""
    var_of = lambda x: masked_mean(jnp.square(x - masked_mean(x, mask)), mask)  # noqa: E731
    var = var_of(target)
    return jnp.where(var > 0, 1.0 - var_of(target - predicted) / var, jnp.nan)


def ppo_loss(
    ac_model: ActorCritic, rng: Array, batch: PPOBatch, config: PPOConfig
) -> tuple[Array, dict[str, Array]]:
    """Clipped-surrogate PPO loss on one minibatch (Schulman et al. 2017, eq. 7 and 9).

    loss = policy_loss + value_coef * value_loss - entropy_coef * entropy, where
    policy_loss = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), r = exp(logp - old_logp), and
    value_loss = mean((V - R)^2) (SB3's form; with clip_value, the max with the clipped V).
    With the batch's masks, means run over the masked samples. With `bc_actions` and
    `config.bc_coef` > 0, it adds bc_coef * bc_loss, bc_loss = -sum(bc_mask * log pi(bc_actions))
    / (number of real samples): behaviour cloning of operator take-overs (HIL-SERL's lesson),
    scaled by their share of the minibatch so a lone take-over does not dominate it.
    """
    pmask, vmask = batch.policy_mask, batch.value_mask
    logp, entropy, value = ac_model.evaluate(rng, batch.obs, batch.actions)
    log_ratio = logp - batch.old_logp
    if pmask is not None:  # masked-out samples may hold any log-prob: keep exp() finite
        log_ratio = jnp.where(pmask > 0, log_ratio, 0.0)
    ratio = jnp.exp(log_ratio)

    adv = batch.advantages
    if config.normalize_advantages and adv.shape[0] > 1:
        mean = masked_mean(adv, pmask)
        adv = (adv - mean) / (jnp.sqrt(masked_mean(jnp.square(adv - mean), pmask)) + 1e-8)
    eps = config.clip_ratio
    surrogate = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - eps, 1.0 + eps))
    policy_loss = masked_mean(surrogate, pmask)

    value_err = jnp.square(value - batch.returns)
    if config.clip_value:
        clipped = batch.old_values + jnp.clip(
            value - batch.old_values, -config.value_clip_range, config.value_clip_range
        )
        value_err = jnp.maximum(value_err, jnp.square(clipped - batch.returns))
    value_loss = masked_mean(value_err, vmask)

    entropy = masked_mean(entropy, vmask)
    loss = policy_loss + config.value_coef * value_loss - config.entropy_coef * entropy
    metrics = {
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy": entropy,
        # k3 estimator of KL(old || new) (Schulman's "Approximating KL divergence"): unbiased, >= 0.
        "approx_kl": masked_mean((ratio - 1.0) - log_ratio, pmask),
        "clip_fraction": masked_mean((jnp.abs(ratio - 1.0) > eps).astype(jnp.float32), pmask),
    }
    if batch.bc_actions is not None and config.bc_coef > 0:
        bc_logp = ac_model.model.policy_logprobs(rng, batch.obs, batch.bc_actions)
        bc_mask = jnp.ones_like(bc_logp) if batch.bc_mask is None else batch.bc_mask
        bc_nll = jnp.where(bc_mask > 0, -bc_logp, 0.0)
        n_real = bc_logp.shape[0] if vmask is None else jnp.maximum(vmask.sum(), 1.0)
        metrics["bc_loss"] = bc_nll.sum() / n_real
        loss = loss + config.bc_coef * metrics["bc_loss"]
    metrics["loss"] = loss
    return loss, metrics


# ----------------------------------------------------------------------------- fused update


def make_optimizer(config: PPOConfig) -> optax.GradientTransformation:
    adam = optax.adam(config.lr, eps=config.adam_eps)
    if config.max_grad_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adam)


def num_minibatches(num_samples: int, config: PPOConfig) -> tuple[int, int]:
    """(number of minibatches, minibatch size) per epoch; a remainder is left out of the epoch
    (a different one each epoch, since the permutation changes)."""
    size = min(config.minibatch_size, num_samples)
    return num_samples // size, size


def ppo_update(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rest: nnx.State,
    opt_state: optax.OptState,
    rng: Array,
    batch: PPOBatch,
    config: PPOConfig,
    constrain_minibatch: Callable[[PPOBatch], PPOBatch] | None = None,
) -> tuple[nnx.State, optax.OptState, dict[str, Array]]:
    """`config.train_iters` epochs x minibatches of PPO in one pure function (jit it whole).

    params: the module's `nnx.Param` state (what is trained); rest: its other state. Returns
    new (params, opt_state) and metrics averaged over the minibatch steps that were applied.
    With `target_kl`, a minibatch whose approx KL passes 1.5 x target_kl is not applied and
    neither is anything after it (SB3's early stop, as masks since a scan cannot break).
    constrain_minibatch: applied to each gathered minibatch, e.g. a `with_sharding_constraint`
    that splits it across devices so gradients are computed data-parallel.
    """
    tx = make_optimizer(config)
    n = batch.actions.shape[0]
    n_mb, mb_size = num_minibatches(n, config)

    def loss_fn(p: nnx.State, mb: PPOBatch, key: Array) -> tuple[Array, dict[str, Array]]:
        return ppo_loss(nnx.merge(graphdef, p, rest), key, mb, config)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch_step(carry: tuple, x: tuple[Array, Array]) -> tuple[tuple, dict[str, Array]]:
        params, opt_state, stopped = carry
        idx, key = x
        mb = jax.tree.map(lambda a: a[idx], batch)
        if constrain_minibatch is not None:
            mb = constrain_minibatch(mb)
        (_, metrics), grads = grad_fn(params, mb, key)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        if config.target_kl is not None:
            stopped = stopped | (metrics["approx_kl"] > 1.5 * config.target_kl)
            keep = lambda old, new: jax.tree.map(lambda o, w: jnp.where(stopped, o, w), old, new)  # noqa: E731
            new_params, new_opt_state = keep(params, new_params), keep(opt_state, new_opt_state)
        metrics["applied"] = 1.0 - stopped.astype(jnp.float32)
        return (new_params, new_opt_state, stopped), metrics

    def epoch(carry: tuple, key: Array) -> tuple[tuple, dict[str, Array]]:
        perm_key, mb_key = jax.random.split(key)
        idx = jax.random.permutation(perm_key, n)[: n_mb * mb_size].reshape(n_mb, mb_size)
        return jax.lax.scan(minibatch_step, carry, (idx, jax.random.split(mb_key, n_mb)))

    carry = (params, opt_state, jnp.zeros((), bool))
    (params, opt_state, _), metrics = jax.lax.scan(
        epoch, carry, jax.random.split(rng, config.train_iters)
    )
    applied = metrics.pop("applied")
    count = jnp.maximum(applied.sum(), 1.0)
    out = {k: (v * applied).sum() / count for k, v in metrics.items()}
    out["update_fraction"] = applied.mean()
    out["explained_variance"] = explained_variance(
        batch.old_values, batch.returns, batch.value_mask
    )
    return params, opt_state, out


_ppo_update_jit = jax.jit(ppo_update, static_argnames=("graphdef", "config"))


class PPOTrainer:
    """Carries (params, optimizer state) of an ActorCritic across fused PPO updates.

    `update` writes the new weights back into the module, so code holding `ac_model` sees
    them; while a trainer owns a model, change its weights through the trainer.
    """

    def __init__(self, ac_model: ActorCritic, config: PPOConfig):
        self.ac_model = ac_model
        self.config = config
        self.graphdef, self.params, self.rest = nnx.split(ac_model, nnx.Param, ...)
        self.opt_state = make_optimizer(config).init(self.params)

    def update(self, rng: Array, batch: PPOBatch) -> dict[str, Array]:
        self.params, self.opt_state, metrics = _ppo_update_jit(
            self.graphdef, self.params, self.rest, self.opt_state, rng, batch, self.config
        )
        nnx.update(self.ac_model, self.params)
        return metrics

    def step(
        self,
        rng: Array,
        obs: Observation,
        actions: Array,
        rewards: Array,
        dones: Array,
        old_logp: Array,
        old_values: Array,
        *,
        last_value: float | Array = 0.0,
    ) -> tuple[Array, dict[str, Array]]:
        """`ppo_step` on one trajectory with this trainer's optimizer state (Adam's moments
        carry from call to call). Returns (mean loss, metrics)."""
        validate_observation(obs, self.ac_model.model.obs_spec)
        rewards = jnp.asarray(rewards, jnp.float32)
        if rewards.ndim != 1:
            raise ValueError(f"rewards: expected [T], got shape {list(rewards.shape)}")
        old_values = jnp.asarray(old_values, jnp.float32)
        last = jnp.reshape(jnp.asarray(last_value, jnp.float32), (1,))
        adv, ret = gae_advantages(
            rewards[:, None], old_values[:, None], jnp.asarray(dones)[:, None], None, last,
            self.config.gamma, self.config.lam,
        )  # fmt: skip
        batch = PPOBatch(
            obs=dict(obs),
            actions=jnp.asarray(actions),
            old_logp=jnp.asarray(old_logp, jnp.float32),
            old_values=old_values,
            advantages=adv[:, 0],
            returns=ret[:, 0],
        )
        metrics = self.update(rng, batch)
        return metrics["loss"], metrics


def flatten_rollout(
    obs: Mapping[str, Array],
    actions: Array,
    logp: Array,
    values: Array,
    advantages: Array,
    returns: Array,
) -> PPOBatch:
    """[T, B, ...] rollout arrays -> a flat PPOBatch of N = T * B samples."""
    flat = lambda x: jnp.reshape(x, (-1, *jnp.shape(x)[2:]))  # noqa: E731
    return PPOBatch(
        obs={k: flat(v) for k, v in obs.items()},
        actions=flat(actions),
        old_logp=flat(logp),
        old_values=flat(values),
        advantages=flat(advantages),
        returns=flat(returns),
    )


# ----------------------------------------------------------------------------- seed API


def ppo_step(
    ac_model: ActorCritic,
    rng: Array,
    obs: Observation,
    actions: Array,
    rewards: Array,
    dones: Array,
    old_logp: Array,
    old_values: Array,
    config: PPOConfig,
    *,
    last_value: float | Array = 0.0,
    trainer: PPOTrainer | None = None,
) -> tuple[Array, dict[str, Array]]:
    """One PPO update on one trajectory, updating `ac_model` in place (the seed's API).

    obs: dict of [T, ...]; actions: [T, H, D]; rewards, dones, old_logp, old_values: [T], in
    time order. last_value: the value after step T-1 if the trajectory was cut (0 = it ended).
    Runs GAE then `config.train_iters` epochs of minibatch updates. Returns the mean loss over
    the applied minibatch steps and the metrics dict. `obs` is checked against the model's
    `obs_spec` first (ValueError naming the key).

    The optimizer state is the caller's: pass `trainer=PPOTrainer(ac_model, config)` and keep
    it between calls so Adam's moments carry over (as optax's `opt_state` does); without one,
    each call starts a fresh optimizer state.
    """
    if trainer is None:
        trainer = PPOTrainer(ac_model, config)
    elif trainer.ac_model is not ac_model or trainer.config != config:
        raise ValueError(
            "trainer: expected the PPOTrainer built for this ac_model and config (it holds "
            "their optimizer state), got one for another model or config"
        )
    return trainer.step(
        rng, obs, actions, rewards, dones, old_logp, old_values, last_value=last_value
    )
