import jax
import numpy as np
import pytest

from openpi_rl.models import GaussianMLPConfig, Pi0FASTConfig
from openpi_rl.policy_server.snapshot import PolicySnapshot, example_observation, padded_sizes
from openpi_rl.rl import ActorCritic


def test_padded_sizes_cover_every_batch_up_to_max():
    assert padded_sizes(8) == (1, 2, 4, 8)
    assert padded_sizes(6) == (1, 2, 4, 6)
    assert padded_sizes(1) == (1,)


def _snapshot(config, max_batch=4):
    ac = ActorCritic(config.create(jax.random.key(0)), value_in_dim=config.value_in_dim)
    return PolicySnapshot(1, ac, config.obs_spec, padded_sizes(max_batch))


def test_after_warm_up_no_batch_size_compiles_again():
    config = GaussianMLPConfig(obs_dim=5, action_dim=2, action_horizon=3)
    snap = _snapshot(config)
    example = example_observation(config.obs_spec)
    snap.warm_up(example)
    compiled = snap.compilations
    assert compiled == 3  # sizes 1, 2, 4
    rng = np.random.default_rng(0)
    for n in (1, 3, 2, 4, 1):
        obs = [{"state": rng.standard_normal(5).astype(np.float32)} for _ in range(n)]
        out = snap.sample(n, obs)
        assert out.actions.shape == (n, 3, 2) and out.logp.shape == (n,)
    assert snap.compilations == compiled


def test_token_policy_snapshot_returns_tokens_as_policy_actions():
    config = Pi0FASTConfig(
        variant="dummy",
        image_size=32,
        patch_size=8,
        prompt_len=0,
        action_horizon=2,
        action_dim=2,
        state_dim=3,
    )
    snap = _snapshot(config, max_batch=2)
    obs = [example_observation(config.obs_spec) for _ in range(2)]
    out = snap.sample(0, obs)
    assert out.actions.shape == (2, 2, 2)
    assert out.policy_actions.dtype == np.int32 and out.policy_actions.shape[0] == 2


def test_with_leaves_refuses_other_shapes_and_check_catches_non_finite_weights():
    config = GaussianMLPConfig(obs_dim=5, action_dim=2, action_horizon=3)
    snap = _snapshot(config)
    example = example_observation(config.obs_spec)
    snap.warm_up(example)
    compiled = snap.compilations
    leaves = [np.asarray(x) for x in jax.tree.leaves(snap.state)]
    with pytest.raises(ValueError, match="weight arrays"):
        snap.with_leaves(2, leaves[:-1])
    wrong = [*leaves[:-1], np.zeros((*leaves[-1].shape, 2), leaves[-1].dtype)]
    with pytest.raises(ValueError, match=f"leaf {len(leaves) - 1}: expected"):
        snap.with_leaves(2, wrong)

    shifted = snap.with_leaves(2, [x + 1 for x in leaves])  # numpy, as a restore worker sends
    assert shifted.version == 2 and shifted.check(example)
    assert not np.allclose(shifted.sample(0, [example]).value, snap.sample(0, [example]).value)
    nan = snap.with_leaves(3, [np.full_like(x, np.nan) for x in leaves])
    assert not nan.check(example)
    assert snap.compilations == compiled  # new weights, same executables
