import jax
import jax.numpy as jnp
import numpy as np

from openpi_rl.models import GaussianMLPConfig


def test_logprob_and_entropy_match_the_diagonal_gaussian_formulas():
    config = GaussianMLPConfig(obs_dim=3, action_dim=2, action_horizon=2, log_std_init=-0.3)
    model = config.create(jax.random.key(0))
    obs = {"state": jax.random.normal(jax.random.key(1), (5, 3))}
    actions = jax.random.normal(jax.random.key(2), (5, 2, 2))
    mean = np.asarray(model.mean(obs))
    std = np.exp(-0.3)
    expected = (
        -0.5 * ((np.asarray(actions) - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    ).sum((1, 2))
    np.testing.assert_allclose(model.policy_logprobs(None, obs, actions), expected, rtol=1e-5)
    np.testing.assert_allclose(
        model.entropy(None, obs), np.full(5, 4 * (0.5 + 0.5 * np.log(2 * np.pi) - 0.3)), rtol=1e-5
    )


def test_samples_have_the_policy_mean_and_std_and_fused_logprob_agrees():
    config = GaussianMLPConfig(obs_dim=4, action_dim=1, log_std_init=np.log(0.5))
    model = config.create(jax.random.key(0))
    obs = {"state": jnp.ones((20000, 4))}
    actions, logp, stored = model.sample_with_logprobs(jax.random.key(3), obs)
    assert stored is actions
    assert actions.shape == (20000, 1, 1)
    mean = float(model.mean(obs)[0, 0, 0])
    assert abs(float(actions.mean()) - mean) < 0.02
    assert abs(float(actions.std()) - 0.5) < 0.02
    np.testing.assert_allclose(
        logp, model.policy_logprobs(None, obs, actions), rtol=1e-5, atol=1e-5
    )
