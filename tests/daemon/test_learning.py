"""End to end on a real replay: chunks served by the learner's current version, a synthetic
reward written into the replay as the robot would report it, and the mean reward rises."""

import numpy as np
from learner_helpers import learner_config

from openpi_rl.daemon import Learner
from openpi_rl.rl import PPOConfig

TARGET = np.array([[0.5, -0.5], [0.5, -0.5]], np.float32)  # [H, D]


def test_mean_reward_rises_over_versions(tmp_path, recorder):
    ppo = PPOConfig(lr=3e-2, train_iters=4, minibatch_size=32, entropy_coef=0.0, gamma=0.9)
    config = learner_config(tmp_path, ppo=ppo, batch_segments=16, max_kl=None)
    learner = Learner(config)
    recorder.ac = learner.ac  # the server swaps to each published version: serve with it
    rng = np.random.default_rng(0)
    means = []
    try:
        for version in range(5):  # the rise is there by version 4 (seeded: -0.89 -> -0.68)
            rewards = []
            for e in range(16):
                for t in range(8):
                    obs = {"state": rng.standard_normal(3).astype(np.float32)}
                    tid, actions = recorder.serve("r", f"v{version}e{e}", t, obs, version)
                    reward = -float(np.abs(actions - TARGET).mean())
                    recorder.writer.report(tid, reward, done=t == 7, truncated=False)
                    rewards.append(reward)
            recorder.writer.flush()
            means.append(float(np.mean(rewards)))
            result = learner.step()
            assert result.published and result.version == version + 1
            assert result.transitions == 128
    finally:
        learner.close()
    print("mean reward per version:", [round(m, 3) for m in means])
    assert np.mean(means[-2:]) > means[0] + 0.15, means
    assert all(np.isfinite(means))
