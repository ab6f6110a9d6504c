"""openpi's Pi0-FAST in the RL API (models/pi0_fast_openpi.py): the seed's usage, the PPO ratio
at 1, a PPO update, and greedy decoding against openpi's own tokens on the golden tiny weights
(tests/fixtures/openpi_pi0_fast/, see its README.md). Tokenizers: the tiny fixtures in
tests/fixtures/tokenizers/."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx

from openpi_rl.config_file import from_dict
from openpi_rl.models.pi0_fast_openpi import (
    EOS,
    Pi0FASTOpenPI,
    Pi0FASTOpenPIConfig,
)
from openpi_rl.rl import ActorCritic, PPOBatch, PPOConfig, PPOTrainer, validate_observation
from openpi_rl.rl.ppo import ppo_step
from openpi_rl.train.train_ppo import PPOTrainConfig

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
TOK = FIXTURES / "tokenizers"
GOLDEN = FIXTURES / "openpi_pi0_fast" / "tiny"

TINY = Pi0FASTOpenPIConfig(
    paligemma_tokenizer=str(TOK / "paligemma_tiny.model"),
    fast_tokenizer=str(TOK / "fast_tiny"),
    norm_stats=str(TOK / "norm_stats.json"),
    gemma_variant="dummy",
    siglip_variant="dummy",
    max_decoding_steps=24,
)


@pytest.fixture(scope="module")
def model() -> Pi0FASTOpenPI:
    return TINY.create(jax.random.key(0))


@nnx.jit
def _evaluate(model: Pi0FASTOpenPI, obs: dict, ids: jax.Array) -> tuple:
    """policy_logprobs, evaluate_actions and value_features in one compiled call."""
    logp, ent, feats = model.evaluate_actions(None, obs, ids)
    return model.policy_logprobs(None, obs, ids), logp, ent, feats, model.value_features(None, obs)


def _obs(config: Pi0FASTOpenPIConfig, batch: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    s = config.image_size
    rows = [
        config.make_obs(
            f"pick up block {i}",
            rng.normal(size=config.state_dim).astype(np.float32),
            {c: rng.integers(0, 256, (s, s, 3), np.uint8) for c in config.cameras},
        )
        for i in range(batch)
    ]
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_seed_programmatic_usage(model):
    # The seed's snippet with this config (value_in_dim is the decoder's width).
    config = TINY
    rng = jax.random.key(42)
    ac_model = ActorCritic(model, value_in_dim=config.value_in_dim)
    obs = config.fake_obs(1)
    actions = model.sample_actions(rng, obs)
    rewards = jnp.array([0.5])
    dones = jnp.array([False])
    old_logp = model.policy_logprobs(rng, obs, actions)
    old_values = ac_model.value(rng, obs)
    loss, metrics = ppo_step(
        ac_model, rng, obs, actions, rewards, dones, old_logp, old_values, PPOConfig()
    )
    assert actions.shape == (1, config.action_horizon, config.action_dim)
    assert actions.dtype == jnp.float32
    assert model.value_features(rng, obs).shape == (1, config.value_in_dim)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(float(v)) for k, v in metrics.items() if k != "explained_variance")


def test_obs_spec_and_host_tokenization(model):
    obs = _obs(TINY, 2)
    assert validate_observation(obs, model.obs_spec) == 2
    assert set(TINY.serving_key_sets[1]) == set(model.obs_spec)
    # The prompt holds the normalised, discretised state as openpi's text.
    one = TINY.tokenize("pick up block 0", np.asarray(obs["state"][0]))
    np.testing.assert_array_equal(one["tokenized_prompt"], obs["tokenized_prompt"][0])
    text = TINY.tokenizer().paligemma.decode(one["tokenized_prompt"][one["tokenized_prompt_mask"]])
    assert text.startswith("Task: pick up block 0, State: ")


def test_sampled_logprob_equals_policy_logprobs(model):
    obs = _obs(TINY, 3)
    actions, logp, ids = jax.jit(model.sample_with_logprobs)(jax.random.key(3), obs)
    assert ids.shape == (3, TINY.max_decoding_steps) and ids.dtype == jnp.int32
    assert actions.shape == (3, TINY.action_horizon, TINY.action_dim)
    tf_logp, ev_logp, ent, feats, value_feats = _evaluate(model, obs, ids)
    np.testing.assert_allclose(tf_logp, logp, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ev_logp, logp, rtol=1e-5, atol=1e-4)
    assert ent.shape == (3,) and feats.shape == (3, TINY.value_in_dim)
    np.testing.assert_allclose(feats, value_feats, rtol=1e-5, atol=1e-5)


def test_early_eos_and_topk_logprobs(model):
    """Rows ending at EOS (the rest padding) and top-k sampling keep the ratio at 1."""
    config = dataclasses.replace(TINY, top_k=5, temperature=0.7)
    m = Pi0FASTOpenPI(config, paligemma=model.paligemma)
    obs = _obs(config, 2)
    out = nnx.jit(lambda m, rng, obs: m.decode(rng, obs))(m, jax.random.key(0), obs)
    logp = nnx.jit(lambda m, obs, ids: m.policy_logprobs(None, obs, ids))
    np.testing.assert_allclose(logp(m, obs, out["ids"]), out["logp"], atol=1e-4)
    # An EOS in the middle: what follows does not count.
    ids = np.asarray(out["ids"]).copy()
    ids[:, 4] = EOS
    cut = ids.copy()
    cut[:, 5:] = 0
    np.testing.assert_allclose(logp(m, obs, ids), logp(m, obs, cut), atol=1e-5)


def test_continuous_actions_round_trip_through_openpi_postfix():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, TINY.action_horizon)[:, None]
    actions = (0.3 * np.sin(2 * np.pi * t + rng.uniform(0, 6, (2, 1, TINY.action_dim)))).astype(
        np.float32
    )
    stats = TINY.stats()["actions"]
    raw = (actions + 1) / 2 * (stats.q99 - stats.q01) + stats.q01  # unnormalised
    ids = TINY.actions_to_tokens(raw)
    assert (ids == EOS).sum(1).tolist() == [1, 1]
    back = TINY.tokens_to_actions(ids)
    # Within FAST's DCT quantisation (scale 10), in normalised units.
    scale = (stats.q99 - stats.q01) / 2
    assert np.abs((back - raw) / scale).max() <= np.sqrt(TINY.action_horizon) * 0.5 / 10 + 1e-4


def test_one_ppo_update_raises_the_logprob_of_a_positively_advantaged_chunk(model):
    ac = ActorCritic(model, value_in_dim=TINY.value_in_dim, value_hidden=(32,))
    obs = _obs(TINY, 4)
    _, logp, value, tokens = ac.act(jax.random.key(2), obs)
    adv = jnp.array([1.0, -1.0] * 2)
    batch = PPOBatch(obs, tokens, logp, value, adv, value + adv)
    PPOTrainer(ac, PPOConfig(lr=1e-3, train_iters=1, minibatch_size=4)).update(
        jax.random.key(0), batch
    )
    gain = np.asarray(model.policy_logprobs(None, obs, tokens) - logp)
    assert gain[0::2].mean() > 0 > gain[1::2].mean()


def test_selectable_as_model_kind():
    config = from_dict(PPOTrainConfig, {"model": {"kind": "pi0_fast_openpi", "max_token_len": 64}})
    assert isinstance(config.model, Pi0FASTOpenPIConfig) and config.model.max_token_len == 64
    toml = {"kind": "pi0_fast_openpi", "cameras": ["a", "b"], "gemma_overrides": [["depth", 1]]}
    model = from_dict(PPOTrainConfig, {"model": toml}).model
    assert model.cameras == ("a", "b") and model.gemma_overrides == (("depth", 1),)
    hash(model)  # jit keys on it
    assert from_dict(PPOTrainConfig, {"model": {"kind": "pi0_fast"}}).model.KIND == "pi0_fast"


# ----------------------------------------------------------------------------- constrained


def test_constrained_decoding_writes_only_chunks_openpi_can_read(model):
    """Sampled from near-uniform random weights, every chunk is "Action: ", FAST ids adding up
    to exactly H * D coefficients, "|", EOS, so openpi's extract_actions reads each one; the
    stored ids score to the behaviour log-prob under the same constraint."""
    config = dataclasses.replace(TINY, constrain_actions=True, max_decoding_steps=36)
    g = config.grammar()
    assert g.coeffs == 30 and g.max_len == 35
    m = Pi0FASTOpenPI(config, paligemma=model.paligemma)
    obs = _obs(config, 6)
    tok = config.tokenizer()
    for temperature in (1.0, 0.0):
        c = dataclasses.replace(config, temperature=temperature)
        m = Pi0FASTOpenPI(c, paligemma=model.paligemma)
        out = nnx.jit(lambda m, rng, obs: m.decode(rng, obs))(m, jax.random.key(5), obs)
        for row in np.asarray(out["ids"]):
            body_end = int(np.argmax(row == EOS)) + 1 - len(g.tail)
            assert row[: len(g.head)].tolist() == g.head.tolist()
            assert row[body_end : body_end + len(g.tail)].tolist() == g.tail.tolist()
            assert g.char_len[row[len(g.head) : body_end]].sum() == g.coeffs
            before = tok.malformed_actions
            tok.extract_actions(row, c.action_horizon, c.action_dim)
            assert tok.malformed_actions == before
        logp = nnx.jit(lambda m, obs, ids: m.policy_logprobs(None, obs, ids))
        np.testing.assert_allclose(logp(m, obs, out["ids"]), out["logp"], rtol=1e-5, atol=1e-3)
    # Unconstrained, the same weights write no readable chunk; a chunk outside the grammar
    # (a FAST id where "Action: " must be) has probability 0 under it.
    free = Pi0FASTOpenPI(TINY, paligemma=model.paligemma)
    ids = np.asarray(nnx.jit(lambda m, r, o: m.decode(r, o))(free, jax.random.key(5), obs)["ids"])
    assert not any(row[: len(g.head)].tolist() == g.head.tolist() for row in ids)
    bad = np.asarray(out["ids"]).copy()
    bad[:, 0] = int(np.nonzero(g.char_len)[0][0])
    assert np.all(np.asarray(logp(m, obs, bad)) < -1e29)


def test_constrained_decoding_needs_room_for_a_whole_chunk():
    with pytest.raises(ValueError, match=r"max_decoding_steps: expected >= 35"):
        dataclasses.replace(TINY, constrain_actions=True).grammar()


def test_gym_task_state_written_into_the_prompt_inside_the_model():
    """for_env: no cameras, the state alone; the model tokenizes it into the fixed prompt as
    openpi's pipeline does (here on the host, from inside jit), decodes only readable chunks,
    and the PPO ratio starts at 1."""
    config = dataclasses.replace(TINY, action_horizon=1, max_decoding_steps=6).for_env(4, 1)
    assert config.cameras == () and config.constrain_actions and config.prompt
    model = config.create(jax.random.key(0))
    states = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    obs = {"state": jnp.asarray(states)}
    assert validate_observation(obs, model.obs_spec) == 5
    tokens, mask = jax.jit(model.prompt_tokens)(obs)
    for i, state in enumerate(states):
        one = config.tokenize(config.prompt, state)
        np.testing.assert_array_equal(tokens[i], one["tokenized_prompt"])
        np.testing.assert_array_equal(mask[i], one["tokenized_prompt_mask"])
    actions, logp, ids = jax.jit(model.sample_with_logprobs)(jax.random.key(1), obs)
    assert actions.shape == (5, 1, 1)
    # One FAST id per chunk: the action is its coefficient / scale (raw units, no norm stats).
    fast = config.tokenizer().act_tokens_to_paligemma_tokens(np.asarray(ids)[:, 3])
    bpe = tokenizers.Tokenizer.from_file(str(TOK / "fast_tiny" / "tokenizer.json"))
    coeffs = [ord(bpe.decode([int(f)])) - 32 for f in fast]
    np.testing.assert_allclose(np.asarray(actions)[:, 0, 0], np.array(coeffs) / 10, atol=1e-6)
    np.testing.assert_allclose(model.policy_logprobs(None, obs, ids), logp, atol=1e-4)
    with pytest.raises(ValueError, match="tokenized_prompt"):
        TINY.create(jax.random.key(0)).prompt_tokens({"state": obs["state"]})


def test_unrolled_layers_equal_the_scan():
    """scan=False runs the same stacked weights layer by layer: the same weights (built from
    the same key), the same logits."""
    scanned = TINY.create(jax.random.key(0))
    unrolled = dataclasses.replace(TINY, scan=False).create(jax.random.key(0))
    assert unrolled.paligemma.llm.config.scan is False
    a, b = jax.tree.leaves(nnx.state(scanned)), jax.tree.leaves(nnx.state(unrolled))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    obs = _obs(TINY, 2)
    ids = scanned.decode(jax.random.key(0), obs)["ids"]
    logits = nnx.jit(lambda m, o, i: m.teacher_forced(o, i)[0])
    np.testing.assert_allclose(logits(unrolled, obs, ids), logits(scanned, obs, ids), atol=1e-5)


# ----------------------------------------------------------------------------- openpi golden


def _golden_config() -> Pi0FASTOpenPIConfig:
    meta = json.loads((GOLDEN / "config.json").read_text())
    g, s = meta["gemma"], meta["siglip"]
    keys = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size")
    siglip = {k: s[k] for k in ("width", "depth", "mlp_dim", "num_heads")}
    siglip.update(patch_size=s["patch_size"][0], image_size=meta["image_resolution"][0])
    mc = meta["model_config"]
    return dataclasses.replace(
        TINY,
        gemma_overrides=tuple((k, g[k]) for k in keys),
        siglip_overrides=tuple(siglip.items()),
        cameras=tuple(meta["cameras"]),
        action_horizon=mc["action_horizon"],
        action_dim=mc["action_dim"],
        max_token_len=mc["max_token_len"],
        max_decoding_steps=meta["max_decoding_steps"],
        temperature=0.0,
    )


@pytest.mark.skipif(not (GOLDEN / "outputs.npz").exists(), reason="golden fixtures not present")
def test_greedy_tokens_equal_openpi_on_golden_weights():
    config = _golden_config()
    model = config.load(GOLDEN / "params")
    inputs, outputs = np.load(GOLDEN / "inputs.npz"), np.load(GOLDEN / "outputs.npz")
    # openpi's infer Observation as ours: uint8 cameras (openpi fed u8 / 255 * 2 - 1, as we do),
    # the tokenized prefix and its mask; every camera valid.
    obs = {c: jnp.asarray(inputs[f"image_u8/{c}"]) for c in config.cameras}
    obs["tokenized_prompt"] = jnp.asarray(inputs["infer_tokenized_prompt"])
    obs["tokenized_prompt_mask"] = jnp.asarray(inputs["infer_tokenized_prompt_mask"])
    validate_observation(obs, model.obs_spec)
    actions, logp, ids = jax.jit(model.sample_with_logprobs)(jax.random.key(2), obs)
    np.testing.assert_array_equal(ids, outputs["greedy_tokens"])
    assert actions.shape == (2, config.action_horizon, config.action_dim)
    # The behaviour log-prob (greedy: temperature 1) from openpi's teacher-forced logits.
    theirs = jax.nn.log_softmax(outputs["greedy_teacher_forced_logits"], -1)
    theirs = np.take_along_axis(np.asarray(theirs), outputs["greedy_tokens"][..., None], -1)
    np.testing.assert_allclose(logp, theirs[..., 0].sum(-1), rtol=1e-4, atol=1e-3)
    # Example 1 without base_1_rgb (a camera masked in the middle): the exact mask, which
    # openpi's non-cached forward gives (418 55 55 26; openpi's sampler: 418 55 55 55).
    one = {k: v[1:] for k, v in obs.items() if k != "base_1_rgb"}
    ids1 = model.decode(None, one)["ids"]
    assert np.asarray(ids1)[0, :4].tolist() == [418, 55, 55, 26]
    assert outputs["greedy_tokens_masked_camera"][1, :4].tolist() == [418, 55, 55, 55]


def test_full_size_traces_abstractly():
    """openpi's full Pi0-FAST (gemma_2b_lora + So400m/14, 3 cameras of 224x224, 250 prompt
    tokens, 256 decode steps, bf16) through decode and the learner's pass, shapes only."""
    config = Pi0FASTOpenPIConfig(
        gemma_variant="gemma_2b_lora",
        siglip_variant="So400m/14",
        cameras=("base_0_rgb", "base_1_rgb", "wrist_0_rgb"),
        max_token_len=250,
        max_decoding_steps=256,
        dtype="bfloat16",
    )
    graphdef, state = nnx.split(nnx.eval_shape(lambda: config.create(jax.random.key(0))))
    obs = jax.eval_shape(lambda: config.fake_obs(2))
    assert config.image_size == 224 and config.value_in_dim == 2048

    def decode(state, obs):
        return nnx.merge(graphdef, state).decode(jax.random.key(0), obs)

    out = jax.eval_shape(decode, state, obs)
    assert out["ids"].shape == (2, 256) and out["ids"].dtype == jnp.int32

    def evaluate(state, obs, ids):
        return nnx.merge(graphdef, state).evaluate_actions(None, obs, ids)

    logp, ent, feats = jax.eval_shape(evaluate, state, obs, out["ids"])
    assert logp.shape == ent.shape == (2,) and feats.shape == (2, 2048)
    assert logp.dtype == jnp.float32
