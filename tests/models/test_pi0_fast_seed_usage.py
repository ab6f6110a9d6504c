"""The seed's "Programmatic Usage", with only its imports changed (openpi -> openpi_rl)."""

import jax
import jax.numpy as jnp
import numpy as np

from openpi_rl.models.pi0_fast import Pi0FAST, Pi0FASTConfig
from openpi_rl.rl.actor_critic import ActorCritic
from openpi_rl.rl.ppo import PPOConfig, ppo_step


def test_seed_programmatic_usage_runs_as_written():
    # --- the seed's snippet, verbatim below this line ---
    # Create model
    config = Pi0FASTConfig()
    model = config.create(jax.random.key(42))

    # Create actor-critic
    ac_model = ActorCritic(model, value_in_dim=1024)

    # PPO training step
    rng = jax.random.key(42)
    obs = config.fake_obs(1)
    actions = model.sample_actions(rng, obs)
    rewards = jnp.array([0.5])  # Example reward
    dones = jnp.array([False])
    old_logp = model.policy_logprobs(rng, obs, actions)
    old_values = ac_model.value(rng, obs)

    loss, metrics = ppo_step(
        ac_model, rng, obs, actions, rewards, dones, old_logp, old_values, PPOConfig()
    )
    # --- end of the seed's snippet ---
    assert isinstance(model, Pi0FAST)
    assert model.value_features(rng, obs).shape == (1, 1024)
    assert actions.shape == (1, config.action_horizon, config.action_dim)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(float(v)) for k, v in metrics.items() if k != "explained_variance")
