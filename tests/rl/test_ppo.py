import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax
from flax import nnx

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.rl import (
    ActorCritic,
    PPOBatch,
    PPOConfig,
    PPOTrainer,
    gae_advantages,
    ppo_loss,
    ppo_step,
)


def _random_rollout(seed: int, t: int = 40, b: int = 5):
    rng = np.random.default_rng(seed)
    rewards = rng.standard_normal((t, b)).astype(np.float32)
    values = rng.standard_normal((t, b)).astype(np.float32)
    final_values = rng.standard_normal((t, b)).astype(np.float32)
    dones = rng.random((t, b)) < 0.1
    truncated = (rng.random((t, b)) < 0.1) & ~dones
    last = rng.standard_normal(b).astype(np.float32)
    return rewards, values, dones, truncated, last, final_values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_equals_rlax_with_episode_ends_and_truncations(seed):
    rewards, values, dones, truncated, last, final_values = _random_rollout(seed)
    gamma, lam = 0.99, 0.95
    adv, ret = gae_advantages(rewards, values, dones, truncated, last, gamma, lam, final_values)
    for env in range(rewards.shape[1]):
        # rlax has no time limits: a truncated step is an episode end whose reward carries the
        # bootstrap gamma * V(final observation) (the standard reduction, e.g. SB3's).
        r = rewards[:, env] + gamma * final_values[:, env] * truncated[:, env]
        discount = gamma * (1.0 - (dones[:, env] | truncated[:, env]))
        v = np.concatenate([values[:, env], last[env : env + 1]])
        expected = rlax.truncated_generalized_advantage_estimation(r, discount, lam, v)
        np.testing.assert_allclose(adv[:, env], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, adv + values, rtol=1e-6)


def test_gae_without_truncation_equals_rlax():
    rewards, values, dones, _, last, _ = _random_rollout(7)
    adv, _ = gae_advantages(rewards, values, dones, None, last, 0.9, 0.8)
    for env in range(rewards.shape[1]):
        v = np.concatenate([values[:, env], last[env : env + 1]])
        expected = rlax.truncated_generalized_advantage_estimation(
            rewards[:, env], 0.9 * (1.0 - dones[:, env]), 0.8, v
        )
        np.testing.assert_allclose(adv[:, env], expected, rtol=1e-5, atol=1e-5)


def test_gae_refuses_truncation_without_final_values():
    rewards, values, dones, truncated, last, _ = _random_rollout(0)
    with pytest.raises(ValueError, match="final_values"):
        gae_advantages(rewards, values, dones, truncated, last, 0.99, 0.95)


class _FixedActorCritic:
    """Stands in for an ActorCritic with chosen log-probs, entropies and values."""

    def __init__(self, logp, entropy, value):
        self.out = (jnp.asarray(logp), jnp.asarray(entropy), jnp.asarray(value))

    def evaluate(self, rng, obs, actions):
        return self.out


def test_ppo_loss_equals_the_clipped_objective_on_hand_made_numbers():
    old_logp = np.log([0.5, 0.5, 0.5, 0.5])
    new_logp = np.log([0.75, 0.55, 0.35, 0.5])  # ratios 1.5, 1.1, 0.7, 1.0
    adv = np.array([1.0, -2.0, -1.0, 3.0], np.float32)
    batch = PPOBatch(
        {},
        jnp.zeros((4, 1, 1)),
        old_logp,
        jnp.array([0.0, 1.0, 2.0, 3.0]),
        adv,
        jnp.array([1.0, 1.0, 1.0, 1.0]),
    )
    value = np.array([0.5, 1.5, 2.5, 0.0])
    config = PPOConfig(
        clip_ratio=0.2, value_coef=0.5, entropy_coef=0.01, normalize_advantages=False
    )
    loss, m = ppo_loss(
        _FixedActorCritic(new_logp, [1.0, 2.0, 3.0, 4.0], value), None, batch, config
    )
    # Per sample -min(r A, clip(r) A): r=1.5,A=1 -> -1.2 ; r=1.1,A=-2 -> 2.2 ; r=0.7,A=-1 -> 0.8 ; r=1,A=3 -> -3
    policy = np.mean([-1.2, 2.2, 0.8, -3.0])
    value_loss = np.mean((value - 1.0) ** 2)
    assert float(m["policy_loss"]) == pytest.approx(policy, abs=1e-6)
    assert float(m["value_loss"]) == pytest.approx(value_loss, abs=1e-6)
    assert float(m["entropy"]) == pytest.approx(2.5)
    assert float(loss) == pytest.approx(policy + 0.5 * value_loss - 0.01 * 2.5, abs=1e-6)
    assert float(m["clip_fraction"]) == pytest.approx(0.5)  # 1.5 and 0.7 are outside [0.8, 1.2]
    ratio = np.array([1.5, 1.1, 0.7, 1.0])
    assert float(m["approx_kl"]) == pytest.approx(np.mean(ratio - 1 - np.log(ratio)), abs=1e-6)


def test_value_clipping_takes_the_pessimistic_error():
    batch = PPOBatch(
        {}, jnp.zeros((1, 1, 1)), jnp.zeros(1), jnp.array([0.0]), jnp.ones(1), jnp.array([2.0])
    )
    config = PPOConfig(clip_value=True, value_clip_range=0.2, normalize_advantages=False)
    _, m = ppo_loss(
        _FixedActorCritic(jnp.zeros(1), jnp.zeros(1), jnp.array([1.0])), None, batch, config
    )
    assert float(m["value_loss"]) == pytest.approx((0.2 - 2.0) ** 2)  # clipped V = 0.2


def _ac(obs_dim=3, seed=0):
    config = GaussianMLPConfig(obs_dim=obs_dim, action_dim=2)
    return config, ActorCritic(
        config.create(jax.random.key(seed)), value_in_dim=obs_dim, value_hidden=(32,)
    )


def _batch_for(ac, n=256, seed=0, advantage=None):
    rng = np.random.default_rng(seed)
    obs = {"state": jnp.asarray(rng.standard_normal((n, 3)), jnp.float32)}
    actions, logp, value, _ = ac.act(jax.random.key(seed), obs)
    adv = jnp.asarray(rng.standard_normal(n), jnp.float32) if advantage is None else advantage
    return PPOBatch(obs, actions, logp, value, adv, value + adv)


def test_fused_update_raises_logprob_of_positively_advantaged_actions():
    _, ac = _ac()
    batch = _batch_for(ac)
    trainer = PPOTrainer(ac, PPOConfig(lr=1e-3, train_iters=4, minibatch_size=64))
    before = ac.model.policy_logprobs(None, batch.obs, batch.actions)
    metrics = trainer.update(jax.random.key(1), batch)
    after = ac.model.policy_logprobs(
        None, batch.obs, batch.actions
    )  # the module was updated in place
    gain = np.asarray(after - before)
    adv = np.asarray(batch.advantages)
    assert gain[adv > 1].mean() > 0 > gain[adv < -1].mean()
    for key in (
        "policy_loss",
        "value_loss",
        "entropy",
        "approx_kl",
        "clip_fraction",
        "explained_variance",
        "grad_norm",
    ):
        assert np.isfinite(float(metrics[key])), key


def test_fused_update_compiles_once_for_repeated_batches(caplog):
    _, ac = _ac()
    trainer = PPOTrainer(ac, PPOConfig(minibatch_size=64))
    batch = _batch_for(ac)
    jax.clear_caches()  # so the first update compiles, whatever ran before
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for i in range(4):
            trainer.update(jax.random.key(i), batch)
    compiled = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(ppo_update)")]
    assert len(compiled) == 1, [r.getMessage() for r in caplog.records]


def test_target_kl_stops_the_update_early():
    _, ac = _ac()
    batch = _batch_for(ac)
    free = PPOTrainer(ac, PPOConfig(lr=3e-2, train_iters=10)).update(jax.random.key(0), batch)
    _, ac2 = _ac()
    stopped = PPOTrainer(ac2, PPOConfig(lr=3e-2, train_iters=10, target_kl=1e-4)).update(
        jax.random.key(0), batch
    )
    assert float(free["update_fraction"]) == 1.0
    assert float(stopped["update_fraction"]) < 0.5


class MyValueHead(nnx.Module):  # the seed's "Custom Value Head", unchanged
    def __init__(self, in_dim: int, rngs: nnx.Rngs):
        super().__init__()
        self.layers = [
            nnx.Linear(in_dim, 512, rngs=rngs),
            nnx.Linear(512, 256, rngs=rngs),
            nnx.Linear(256, 1, rngs=rngs),
        ]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)[..., 0]


def test_seed_programmatic_usage_with_gaussian_mlp_and_custom_value_head():
    config = GaussianMLPConfig()
    model = config.create(jax.random.key(42))
    ac_model = ActorCritic(
        model,
        value_in_dim=config.value_in_dim,
        value_head=MyValueHead(config.value_in_dim, nnx.Rngs(0)),
    )
    rng = jax.random.key(42)
    obs = config.fake_obs(1)
    actions = model.sample_actions(rng, obs)
    rewards = jnp.array([0.5])
    dones = jnp.array([False])
    old_logp = model.policy_logprobs(rng, obs, actions)
    old_values = ac_model.value(rng, obs)
    head_before = np.asarray(ac_model.value_head.layers[-1].kernel[...]).copy()
    loss, metrics = ppo_step(
        ac_model, rng, obs, actions, rewards, dones, old_logp, old_values, PPOConfig()
    )
    assert np.isfinite(float(loss))
    assert set(metrics) >= {
        "policy_loss",
        "value_loss",
        "entropy",
        "approx_kl",
        "clip_fraction",
        "explained_variance",
        "grad_norm",
    }
    assert not np.allclose(
        head_before, ac_model.value_head.layers[-1].kernel[...]
    )  # the step trained the critic


def test_ppo_step_keeps_adam_state_in_the_callers_trainer_and_learns_a_value():
    """With the caller's trainer, call after call `ppo_step` takes the steps of a PPOTrainer
    updated on the same batches (Adam's moments carry over), and the critic learns the Monte
    Carlo return. Without one, a call keeps nothing: two calls equal two fresh trainers."""
    _, ac = _ac()
    _, twin = _ac()  # the same weights
    obs = {"state": jnp.ones((8, 3))}
    actions = ac.model.sample_actions(jax.random.key(0), obs)
    logp = ac.model.policy_logprobs(None, obs, actions)
    rewards, dones = jnp.zeros(8).at[-1].set(1.0), jnp.zeros(8, bool).at[-1].set(True)
    # Few calls of many epochs: each ppo_step call compiles its GAE scan anew (~0.2 s).
    cfg = PPOConfig(lr=3e-3, gamma=1.0, lam=1.0, minibatch_size=8, train_iters=30)
    values = ac.value(None, obs)  # the same batch every call, so the twin can replay it
    adv, ret = gae_advantages(
        rewards[:, None], values[:, None], dones[:, None], None, jnp.zeros(1), 1.0, 1.0
    )
    trainer = PPOTrainer(twin, cfg)
    batch = PPOBatch(obs, actions, logp, values, adv[:, 0], ret[:, 0])
    mine = PPOTrainer(ac, cfg)
    args = (obs, actions, rewards, dones, logp, values, cfg)
    for _ in range(8):
        ppo_step(ac, jax.random.key(0), *args, trainer=mine)
        trainer.update(jax.random.key(0), batch)
    got, want = nnx.state(ac, nnx.Param), nnx.state(twin, nnx.Param)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Monte Carlo return is 1 at every step (gamma 1): the critic must approach it.
    assert float(jnp.abs(ac.value(None, obs) - 1.0).max()) < 0.1

    _, bare = _ac()
    _, fresh = _ac()
    for _ in range(2):
        ppo_step(bare, jax.random.key(0), *args)
        PPOTrainer(fresh, cfg).update(jax.random.key(0), batch)
    got, want = nnx.state(bare, nnx.Param), nnx.state(fresh, nnx.Param)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="trainer: expected the PPOTrainer built for"):
        ppo_step(bare, jax.random.key(0), *args, trainer=mine)


def test_ppo_step_rejects_non_trajectory_rewards():
    _config, ac = _ac()
    obs = {"state": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match=r"rewards: expected \[T\]"):
        ppo_step(
            ac,
            jax.random.key(0),
            obs,
            jnp.zeros((2, 1, 2)),
            jnp.zeros((2, 1)),
            jnp.zeros(2),
            jnp.zeros(2),
            jnp.zeros(2),
            PPOConfig(),
        )


def test_ppo_step_rejects_an_observation_that_does_not_match_the_spec():
    _, ac = _ac()
    bad = {"state": jnp.ones((2, 5))}
    with pytest.raises(ValueError, match=r"observation\['state'\]: expected float32 \['B', 3\]"):
        ppo_step(
            ac,
            jax.random.key(0),
            bad,
            jnp.zeros((2, 1, 2)),
            jnp.zeros(2),
            jnp.zeros(2),
            jnp.zeros(2),
            jnp.zeros(2),
            PPOConfig(),
        )
