import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from openpi_rl.cli import _seed_style_args
from openpi_rl.train.train_ppo import PPOTrainConfig, train

SMALL = dict(num_envs=2, rollout_length=32)
TOKENIZERS = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Runs without a checkpoint directory write their curves to ./runs: keep them in tmp."""
    monkeypatch.chdir(tmp_path)


def _token_model(kind: str):
    """The embedded look-alike, or openpi's Pi0-FAST (dummy sizes, the tokenizer fixtures,
    the gym state written into a fixed prompt), two actions per chunk."""
    if kind == "pi0_fast":
        from openpi_rl.models.pi0_fast import Pi0FASTConfig

        return Pi0FASTConfig(variant="dummy", action_horizon=2)
    from openpi_rl.models.pi0_fast_openpi import Pi0FASTOpenPIConfig

    return Pi0FASTOpenPIConfig(
        gemma_variant="dummy",
        siglip_variant="dummy",
        scan=False,
        paligemma_tokenizer=str(TOKENIZERS / "paligemma_tiny.model"),
        fast_tokenizer=str(TOKENIZERS / "fast_tiny"),
        action_horizon=2,
        max_token_len=32,
        max_decoding_steps=8,
    )


def test_short_run_collects_episodes_and_reports_finite_metrics():
    result = train(PPOTrainConfig(num_train_steps=2, **SMALL), display=False)
    assert result.updates == 2
    assert result.env_steps == 2 * 2 * 32
    assert result.episodes and all(length >= 1 for _, _, length in result.episodes)
    for key in (
        "policy_loss",
        "value_loss",
        "entropy",
        "approx_kl",
        "clip_fraction",
        "explained_variance",
        "grad_norm",
    ):
        assert np.isfinite(result.metrics[key]), key
    # No checkpoint directory: the curves go where CleanRL puts them, ./runs/<run name>.
    assert list(Path("runs").glob("InvertedPendulum-v5__0__*/tensorboard/events.out.tfevents.*"))


def test_external_reward_replaces_the_env_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def minus_one(observation, actions):\n    return -1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = PPOTrainConfig(
        num_train_steps=1,
        reward_type="external",
        external_reward_fn="my_rewards:minus_one",
        **SMALL,
    )
    result = train(config, display=False)
    assert result.updates == 1
    # Every step is rewarded -1: the critic's targets are negative, so the value loss is large.
    assert result.metrics["value_loss"] > 0.1


def test_a_bad_reward_configuration_is_refused_before_training():
    with pytest.raises(ValueError, match="needs --external_reward_fn"):
        train(PPOTrainConfig(reward_type="external", **SMALL), display=False)
    with pytest.raises(ValueError, match="weight 'x' is not a number"):
        train(PPOTrainConfig(reward_type="composite", composite=("env:x",), **SMALL), display=False)


def test_seed_style_model_flag_maps_to_the_tyro_subcommand():
    from openpi_rl.models.choice import MODEL_NAMES

    expected = ["model:gaussian_mlp"] if len(MODEL_NAMES) > 1 else []
    assert _seed_style_args(["--model.gaussian_mlp", "--env", "X"]) == [*expected, "--env", "X"]
    assert _seed_style_args(["--model.hidden", "8"]) == ["--model.hidden", "8"]


def _train_cmd(ckpt: Path, updates: int) -> list[str]:
    return [
        sys.executable, "-m", "openpi_rl.cli", "train", "--model.gaussian_mlp",
        "--num_envs", "2", "--rollout_length", "16", "--num_train_steps", str(updates),
        "--save_interval", "1", "--checkpoint_dir", str(ckpt),
    ]  # fmt: skip


def _steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def test_killed_training_resumes_from_its_last_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _train_cmd(ckpt, 10_000), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    try:
        deadline = time.monotonic() + 120
        while len(_steps(ckpt)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_steps(ckpt)) >= 2, "no checkpoints written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = _steps(ckpt)[-1]
    out = subprocess.run(
        _train_cmd(ckpt, last + 2), capture_output=True, text=True, env=env, timeout=180
    )
    assert out.returncode == 0, out.stderr
    assert "resumed" in out.stderr and f"update={last}" in out.stderr
    assert f"updates={last + 2}" in out.stderr  # it ran the two remaining updates, not all
    assert _steps(ckpt)[-1] == last + 2


@pytest.mark.parametrize("kind", ["pi0_fast", "pi0_fast_openpi"])
def test_token_policy_trains_through_the_cli_config_on_stored_tokens(monkeypatch, kind):
    """The token policy trains through `train`, and each rollout it learns from holds the
    sampled action tokens whose log-prob, recomputed with the weights that sampled them,
    is the stored behaviour log-prob (the PPO ratio starts at exactly 1)."""
    import jax
    from flax import nnx

    from openpi_rl.train import train_ppo
    from openpi_rl.train.learner import RolloutLearner

    seen: list[tuple[RolloutLearner, dict, object]] = []

    class RecordingLearner(RolloutLearner):  # the real learner; keeps what `learn` is given
        def learn(self, update: int, rollout: dict) -> dict:
            weights = jax.tree.map(np.array, self.params)  # a copy: the update writes in place
            seen.append((self, {k: v.copy() for k, v in rollout.items()}, weights))
            return super().learn(update, rollout)

    monkeypatch.setattr(train_ppo, "RolloutLearner", RecordingLearner)
    model = _token_model(kind)
    malformed = model.tokenizer().malformed_actions if kind == "pi0_fast_openpi" else 0
    result = train(PPOTrainConfig(model=model, num_train_steps=2, **SMALL), display=False)
    assert result.updates == 2 and np.isfinite(result.metrics["policy_loss"])

    assert len(seen) == 2
    learner = seen[0][0]
    env_model = model.for_env(4, 1)
    if kind == "pi0_fast":
        num_ids = env_model.action_tokenizer().num_tokens + 1  # the chunk's tokens, then EOA
    else:
        num_ids = env_model.max_decoding_steps
        # Constrained decoding: every chunk decoded (none fell back to zeros).
        assert env_model.tokenizer().malformed_actions == malformed

    @jax.jit
    def recompute(params, obs, tokens):
        ac = nnx.merge(learner.graphdef, params, learner.rest)
        return ac.model.policy_logprobs(None, {"state": obs}, tokens)

    for _, rollout, params in seen:  # the second rollout was sampled by updated weights
        t, n = rollout["logp"].shape
        tokens = rollout["actions"]
        assert tokens.dtype == np.int32 and tokens.shape == (t, n, num_ids)
        logp = recompute(params, rollout["obs"].reshape(t * n, -1), tokens.reshape(t * n, -1))
        np.testing.assert_allclose(np.asarray(logp).reshape(t, n), rollout["logp"], atol=1e-4)


def test_lora_finetuning_of_a_model_without_lora_weights_is_refused():
    from openpi_rl.models.choice import ModelConfigError

    with pytest.raises(ModelConfigError, match="finetune: 'lora' needs a model with LoRA"):
        train(PPOTrainConfig(finetune="lora", num_train_steps=1, **SMALL), display=False)


def test_a_trained_policy_exported_as_an_openpi_checkpoint_is_what_a_service_starts_from(tmp_path):
    """`openpi-rl train --export-openpi DIR` writes openpi's checkpoint layout; a config naming it
    as `checkpoint` (here with LoRA adapters added, as a service fine-tunes it) starts from
    exactly those weights: same logits, and the LoRA adapters change nothing until trained."""
    import dataclasses

    import jax
    from flax import nnx

    from openpi_rl.models.paligemma.checkpoint import restore_openpi_params
    from openpi_rl.train import train_ppo
    from openpi_rl.train.learner import RolloutLearner

    kept: list[RolloutLearner] = []

    class KeepingLearner(RolloutLearner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            kept.append(self)

    model = _token_model("pi0_fast_openpi")
    out = tmp_path / "pretrained"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_ppo, "RolloutLearner", KeepingLearner)
        train(PPOTrainConfig(model=model, num_train_steps=1, export_openpi=str(out), **SMALL), display=False)  # fmt: skip
    assert set(restore_openpi_params(out)) == {"PaliGemma"}  # openpi's layout, item `params`
    trained = nnx.merge(kept[0].graphdef, kept[0].params, kept[0].rest).model
    env_model = trained.config
    lora = dataclasses.replace(env_model, gemma_variant="dummy_lora", checkpoint=str(out))
    loaded = lora.create(jax.random.key(3))
    obs = env_model.fake_obs(2)
    obs["state"] = jax.numpy.asarray(np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4))
    ids = trained.decode(jax.random.key(0), obs, greedy=True)["ids"]
    a, _, _ = trained.teacher_forced(obs, ids)
    b, _, _ = loaded.teacher_forced(obs, ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    with pytest.raises(ValueError, match="export_openpi: only pi0_fast_openpi"):
        train(PPOTrainConfig(num_train_steps=1, export_openpi=str(tmp_path / "x"), **SMALL), display=False)  # fmt: skip


def test_critic_warmup_updates_move_only_the_value_head():
    """Update 0 of a run with critic_warmup_updates=1 leaves the policy's weights bit-identical
    and moves the value head; update 1 moves the policy."""
    import jax
    from flax import nnx

    from openpi_rl.models.choice import build_actor_critic
    from openpi_rl.models.finetune import CRITIC
    from openpi_rl.models.gaussian_mlp import GaussianMLPConfig
    from openpi_rl.train.learner import RolloutLearner
    from openpi_rl.train.train_ppo import TRAIN_PPO_DEFAULTS

    model = GaussianMLPConfig(obs_dim=4, action_dim=1, action_horizon=1, hidden=(16,))
    ac = build_actor_critic(model, (16,), 0)
    learner = RolloutLearner(ac, TRAIN_PPO_DEFAULTS, 0, 8, 2, 4, (1, 1), critic_warmup_updates=1)

    def arrays(*filters):
        return [np.array(x) for x in jax.tree.leaves(nnx.state(ac, *filters))]

    policy = nnx.All(nnx.Param, nnx.Not(CRITIC))
    rng = np.random.default_rng(0)
    rollout = learner.new_rollout()
    for k in ("obs", "final_obs", "last_obs", "actions", "rewards"):
        rollout[k] = rng.standard_normal(rollout[k].shape).astype(np.float32)
    before, head = arrays(policy), arrays(CRITIC)
    learner.learn(0, rollout)
    assert all(np.array_equal(a, b) for a, b in zip(before, arrays(policy), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(head, arrays(CRITIC), strict=True))
    learner.learn(1, rollout)
    assert not all(np.array_equal(a, b) for a, b in zip(before, arrays(policy), strict=True))
