import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openpi_rl.models.pi0_fast import Pi0FASTConfig, param_count
from openpi_rl.rl import ActorCritic, PPOBatch, PPOConfig, PPOTrainer, validate_observation

DUMMY = Pi0FASTConfig(
    variant="dummy",
    image_size=32,
    patch_size=8,
    prompt_len=4,
    action_horizon=4,
    action_dim=3,
    state_dim=5,
)


def _obs(config: Pi0FASTConfig, batch: int, seed: int = 1) -> dict:
    obs = config.fake_obs(batch)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    obs["state"] = jax.random.normal(k1, obs["state"].shape)
    for key in config.image_keys:
        obs[key] = jax.random.randint(k2, obs[key].shape, 0, 256).astype(jnp.uint8)
    if config.prompt_len:
        obs["prompt_tokens"] = jax.random.randint(k3, obs["prompt_tokens"].shape, 0, 256)
    return obs


@pytest.fixture(scope="module")
def model():
    return DUMMY.create(jax.random.key(0))


def test_variant_sizes_from_shapes_only():
    assert param_count(DUMMY) < 1_000_000
    assert 1.8e9 < param_count(Pi0FASTConfig(variant="gemma_2b")) < 2.2e9  # never allocated
    assert Pi0FASTConfig().value_in_dim == 1024


def test_fake_obs_matches_the_spec_and_images_and_prompt_are_optional(model):
    assert validate_observation(DUMMY.fake_obs(2), model.obs_spec) == 2
    state_only = {"state": jnp.ones((2, 5))}
    assert validate_observation(state_only, model.obs_spec) == 2
    assert model.sample_actions(jax.random.key(0), state_only).shape == (2, 4, 3)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_k": 5}])
def test_logprob_while_sampling_equals_policy_logprobs(sampling):
    config = dataclasses.replace(DUMMY, **sampling)
    model = config.create(jax.random.key(0))
    obs = _obs(config, 6)
    actions, logp, tokens = jax.jit(model.sample_with_logprobs)(jax.random.key(3), obs)
    assert tokens.shape == (6, model.num_tokens + 1) and tokens.dtype == jnp.int32
    np.testing.assert_allclose(model.policy_logprobs(None, obs, tokens), logp, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(model.to_actions(tokens), actions)
    assert np.all(np.abs(np.asarray(actions)) <= 1.0)


def test_kv_cache_decoding_equals_the_full_forward_pass(model):
    obs = _obs(DUMMY, 4)
    out = model.decode(jax.random.key(5), obs, keep_logits=True)
    full, _, _ = model.forward(obs, out["ids"])
    steps = int(out["i"])
    np.testing.assert_allclose(out["logits"][:, :steps], full[:, :steps], atol=1e-4, rtol=1e-4)
    features = model.value_features(None, obs)
    np.testing.assert_allclose(
        model.evaluate_actions(None, obs, out["ids"])[2], features, atol=1e-5
    )


def test_a_batch_whose_rows_end_at_different_steps_decodes_as_the_full_forward_pass():
    model = DUMMY.create(jax.random.key(0))
    model.head.bias[...] = model.head.bias[...].at[model.eoa].set(2.0)  # ends early, or not
    obs, rng = _obs(DUMMY, 6), jax.random.key(7)
    out = jax.jit(lambda obs: model.decode(rng, obs, keep_logits=True))(obs)
    ids, steps = np.asarray(out["ids"]), int(out["i"])
    lengths = np.argmax(np.concatenate([ids == model.eoa, np.ones((6, 1), bool)], 1), 1)
    assert len(set(lengths.tolist())) > 2 and steps == lengths.max() + 1
    # Every row's cached logits, before and after its EOA, are the teacher-forced ones.
    full, _, _ = model.forward(obs, out["ids"])
    np.testing.assert_allclose(out["logits"][:, :steps], full[:, :steps], atol=1e-4, rtol=1e-4)
    # Step i's tokens are what jax.random.categorical draws with fold_in(rng, i).
    for i in range(steps):
        drawn = jax.random.categorical(jax.random.fold_in(rng, i), out["logits"][:, i])
        live = lengths >= i
        np.testing.assert_array_equal(ids[live, i], np.asarray(drawn)[live])
    np.testing.assert_allclose(model.policy_logprobs(None, obs, out["ids"]), out["logp"], atol=1e-4)
    greedy = model.decode(rng, obs, greedy=True, keep_logits=True)
    first = np.asarray(greedy["ids"])[:, 0]
    np.testing.assert_array_equal(first, np.argmax(np.asarray(greedy["logits"])[:, 0], -1))


def test_decoding_stops_at_the_end_token():
    model = DUMMY.create(jax.random.key(0))
    model.head.bias[...] = model.head.bias[...].at[model.eoa].set(100.0)  # wants to end at once
    out = model.decode(jax.random.key(0), _obs(DUMMY, 3))
    assert int(out["i"]) == 1  # one step, not N + 1
    assert np.all(np.asarray(out["ids"]) == model.eoa)
    np.testing.assert_allclose(model.to_actions(out["ids"]), 0.0)  # all coefficients missing


def test_malformed_tokens_decode_without_an_exception(model):
    garbage = jax.random.randint(jax.random.key(0), (5, model.num_tokens + 1), -1000, 1000)
    actions = model.to_actions(garbage)
    assert actions.shape == (5, 4, 3) and np.all(np.isfinite(np.asarray(actions)))


def test_continuous_actions_are_re_encoded_for_their_logprob(model):
    obs = _obs(DUMMY, 3)
    actions = model.sample_actions(jax.random.key(1), obs)
    logp = model.policy_logprobs(None, obs, actions)
    assert logp.shape == (3,) and np.all(np.isfinite(np.asarray(logp)))


def test_one_ppo_update_raises_the_logprob_of_a_positively_advantaged_chunk():
    model = DUMMY.create(jax.random.key(0))
    ac = ActorCritic(model, value_in_dim=DUMMY.value_in_dim, value_hidden=(32,))
    obs = _obs(DUMMY, 8)
    _, logp, value, tokens = ac.act(jax.random.key(2), obs)
    adv = jnp.array([1.0, -1.0] * 4)
    batch = PPOBatch(obs, tokens, logp, value, adv, value + adv)
    PPOTrainer(ac, PPOConfig(lr=1e-3, train_iters=1, minibatch_size=8)).update(
        jax.random.key(0), batch
    )
    gain = np.asarray(model.policy_logprobs(None, obs, tokens) - logp)
    assert gain[0::2].mean() > 0 > gain[1::2].mean()


def test_last_token_value_pooling():
    config = dataclasses.replace(DUMMY, value_pooling="last")
    model = config.create(jax.random.key(0))
    assert model.value_features(None, _obs(config, 2)).shape == (2, 64)
