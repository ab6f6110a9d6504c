"""What the learner trains: the critic warm-up (value head only, nothing published, counted
across restarts) and LoRA fine-tuning (base frozen, optimizer state only for what trains,
versions that hold only the LoRA arrays and the value head over version 0)."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from learner_helpers import Recorder, learner_config

from openpi_rl.daemon import Learner
from openpi_rl.models.choice import ModelConfigError, build_actor_critic
from openpi_rl.models.finetune import CRITIC, LORA
from openpi_rl.models.pi0_fast_openpi import Pi0FASTOpenPIConfig
from openpi_rl.rl import PPOConfig
from openpi_rl.weights import restore_version
from openpi_rl.weights.versions import MANIFEST


def _arrays(ac, *filters) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(nnx.state(ac, *filters))]


def _policy(ac) -> list[np.ndarray]:
    return _arrays(ac, nnx.All(nnx.Param, nnx.Not(CRITIC)))


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_critic_warmup_trains_only_the_value_head_then_the_policy_moves(tmp_path, recorder):
    """Two warm-up updates: the policy's weights stay bit-identical, the value head moves,
    nothing is published (version 0, no notice); a learner restarted after the first goes on
    counting from the saved warm-up; the update after the warm-up publishes version 1 and
    moves the policy."""
    rng = np.random.default_rng(0)
    config = learner_config(tmp_path, critic_warmup_updates=2)
    learner = Learner(config)
    policy0, head0 = _policy(learner.ac), _arrays(learner.ac, CRITIC)
    recorder.episode("r", "e1", 6, rng)
    recorder.writer.flush()
    result = learner.step()
    assert result.warmup and not result.published and result.version == 0
    assert _same(_policy(learner.ac), policy0)
    assert not _same(_arrays(learner.ac, CRITIC), head0)
    head1 = _arrays(learner.ac, CRITIC)
    assert learner.counters["critic_warmup_updates"] == 1
    assert learner.checkpoints.versions() == [0] and learner.publisher.sent["version"] == 0
    registry = learner.metrics.registry
    assert registry.get_sample_value("openpi_rl_learner_critic_warmup_updates_total") == 1
    learner.close()

    again = Learner(config)  # restarted mid-warm-up: resumes its value head and count
    try:
        assert again.counters["critic_warmup_updates"] == 1 and again.version == 0
        assert _same(_arrays(again.ac, CRITIC), head1)
        recorder.episode("r", "e2", 6, rng)
        recorder.writer.flush()
        result = again.step()
        assert result.warmup and not result.published
        assert _same(_policy(again.ac), policy0)
        assert again.counters["critic_warmup_updates"] == 2
        recorder.episode("r", "e3", 6, rng)
        recorder.writer.flush()
        result = again.step()
        assert result.published and not result.warmup and result.version == 1
        assert not _same(_policy(again.ac), policy0)
        assert again.counters["updates"] == 1
    finally:
        again.close()


def test_lora_on_a_model_without_lora_weights_is_a_config_error(tmp_path):
    with pytest.raises(ModelConfigError, match="finetune"):
        Learner(learner_config(tmp_path, finetune="lora"))


TOK = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers"
LORA_MODEL = Pi0FASTOpenPIConfig(
    gemma_variant="dummy_lora", siglip_variant="dummy", paligemma_tokenizer=str(TOK / "paligemma_tiny.model"),
    fast_tokenizer=str(TOK / "fast_tiny"), norm_stats=str(TOK / "norm_stats.json"),
    max_decoding_steps=36, constrain_actions=True, scan=False,
)  # fmt: skip


def _dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def lora_replay(tmp_path):
    """Two episodes served by the LoRA model at version 0."""
    ac = build_actor_critic(LORA_MODEL, (16, 16), 0)
    rec = Recorder(tmp_path / "replay", ac=ac)
    obs = {k: np.asarray(v)[0] for k, v in LORA_MODEL.fake_obs(1).items()}
    for e in range(2):
        for t in range(4):
            tid, _ = rec.serve("r", f"e{e}", t, obs)
            rec.writer.report(tid, 0.1 * t, done=t == 3, truncated=False)
    rec.close()
    return ac


@pytest.mark.slow  # ~40 s on 2 cores: serves and trains openpi's Pi0-FAST (dummy_lora)
def test_lora_learner_trains_lora_and_value_head_and_saves_deltas(tmp_path, lora_replay):
    """finetune "auto" on a *_lora model: optimizer state only over LoRA + value head; the
    base's weights stay bit-identical; version 1 holds only those arrays and names version 0
    (number and hash) as its base; it restores (base + delta) into a fresh model and into a
    restarted learner; retention keeps the base; a missing base is refused."""
    ppo = PPOConfig(lr=1e-3, train_iters=1, minibatch_size=8)
    config = learner_config(tmp_path, model=LORA_MODEL, ppo=ppo, max_kl=None, keep_versions=1)
    learner = Learner(config)
    try:
        assert learner.finetune == "lora"
        trained = jax.tree.leaves(nnx.state(learner.ac, LORA))
        assert len(jax.tree.leaves(learner.params)) == len(trained)
        assert (
            sum(x.size for x in jax.tree.leaves(learner.opt_state))
            < 3 * sum(x.size for x in trained) + 10
        )
        frozen = nnx.All(nnx.Param, nnx.Not(LORA))
        base_weights, lora0 = _arrays(learner.ac, frozen), _arrays(learner.ac, LORA)
        result = learner.step()
        assert result.published and result.version == 1
        assert _same(_arrays(learner.ac, frozen), base_weights)
        assert not _same(_arrays(learner.ac, LORA), lora0)
        weights1 = _arrays(learner.ac)
    finally:
        learner.close()

    ckpt = tmp_path / "ckpt"
    manifest0 = json.loads((ckpt / "0" / MANIFEST).read_text())
    manifest1 = json.loads((ckpt / "1" / MANIFEST).read_text())
    assert manifest1["base"] == {"version": 0, "sha256": manifest0["sha256"]}
    assert "base" not in manifest0
    assert _dir_bytes(ckpt / "1" / "weights") < _dir_bytes(ckpt / "0" / "weights") / 4

    fresh = build_actor_critic(LORA_MODEL, (16, 16), seed=5)
    nnx.update(fresh, restore_version(ckpt / "1", fresh))
    assert _same(_arrays(fresh), weights1)

    again = Learner(config)  # resumes from the delta: base + delta
    try:
        assert again.version == 1 and _same(_arrays(again.ac), weights1)
        assert again.base == 0 and again.checkpoints.versions() == [0, 1]
    finally:
        again.close()

    shutil.rmtree(ckpt / "0")
    with pytest.raises(Exception, match="base, version 0, is missing"):
        restore_version(ckpt / "1", fresh)
