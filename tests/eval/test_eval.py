"""`openpi-rl eval`: two published versions of a policy trained a little on InvertedPendulum-v5,
evaluated on the same seeds; the table's intervals, the JSON summary, and mp4 files that PyAV
decodes frame by frame (one per episode and version, and the two side by side)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flax import nnx

from openpi_rl.cli import main
from openpi_rl.eval import EvalConfig, evaluate, read_frames
from openpi_rl.models.choice import build_actor_critic
from openpi_rl.models.gaussian_mlp import GaussianMLPConfig
from openpi_rl.train.envs import EnvBatch
from openpi_rl.train.learner import RolloutLearner
from openpi_rl.train.train_ppo import TRAIN_PPO_DEFAULTS
from openpi_rl.weights import VersionCheckpoints

UPDATES = 3  # PPO updates between version 0 and the last version


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """Versions 0 (the seeded start) and UPDATES (after UPDATES PPO updates on 8 envs x 64
    steps), published as the learner publishes them."""
    root = tmp_path_factory.mktemp("eval") / "checkpoints"
    ac = build_actor_critic(GaussianMLPConfig(obs_dim=4, action_dim=1), (64, 64), 0)
    n, t_len = 8, 64
    learner = RolloutLearner(ac, TRAIN_PPO_DEFAULTS, 0, t_len, n, 4, (1, 1))
    versions = VersionCheckpoints(root, None)
    versions.save(0, nnx.state(ac), learner.opt_state, {"update": 0})
    env = EnvBatch("InvertedPendulum-v5", n, 0)
    buf = learner.new_rollout()
    for update in range(UPDATES):
        for t in range(t_len):
            buf["obs"][t] = env.obs
            actions, logp, value, policy_actions = learner.act(update, t, env.obs)
            out, _ = env.step(actions)
            buf["actions"][t], buf["logp"][t], buf["values"][t] = policy_actions, logp, value
            buf["rewards"][t], buf["terminated"][t] = out.rewards, out.terminated
            buf["truncated"][t], buf["final_obs"][t] = out.truncated, out.final_obs
        buf["last_obs"][:] = env.obs
        learner.learn(update, buf)
    env.close()
    versions.save(UPDATES, nnx.state(ac), learner.opt_state, {"update": UPDATES})  # trained
    versions.close()
    return root


def _row(out: str, version: int) -> str:
    return next(line for line in out.splitlines() if re.match(rf"^\W*{version}\W", line))


def test_eval_compares_two_versions_with_intervals_and_videos(checkpoint_dir, tmp_path, capsys):
    videos = tmp_path / "videos"
    rc = main([
        "eval", "--checkpoint-dir", str(checkpoint_dir), "--compare", "0", "--episodes", "3",
        "--max-episode-steps", "40", "--greedy", "--video-dir", str(videos),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads((videos / "summary.json").read_text())
    assert [v["version"] for v in summary["versions"]] == [UPDATES, 0]  # the newest by default
    interval = r"(\d+\.\d+) \[(\d+\.\d+), (\d+\.\d+)\]"
    for v in summary["versions"]:
        row = _row(out, v["version"])
        rate, ret = re.findall(interval, row)  # success rate and mean return, each with [low, high]
        assert float(rate[1]) <= float(rate[0]) <= float(rate[2])
        assert float(ret[1]) <= float(ret[0]) <= float(ret[2])
        episodes = v["episode_results"]
        assert v["mean_return"] == pytest.approx(np.mean([e["ret"] for e in episodes]))
        assert v["successes"] == sum(e["truncated"] and not e["terminated"] for e in episodes)
        for e, path in zip(episodes, v["videos"], strict=True):
            frames = read_frames(path)  # decoded: the reset's frame and one per step
            assert len(frames) == e["length"] + 1 and frames[0].shape == (240, 320, 3)
            assert frames[0].std() > 1  # something was drawn
    # Same seeds: the same initial observation, so the first frames match across versions.
    a, b = (read_frames(v["videos"][0])[0].astype(int) for v in summary["versions"])
    assert np.abs(a - b).mean() < 2
    assert len(summary["comparisons"]) == 3
    for i, path in enumerate(summary["comparisons"]):
        frames = read_frames(path)
        lengths = [v["episode_results"][i]["length"] for v in summary["versions"]]
        assert len(frames) == max(lengths) + 1 and frames[0].shape == (240, 640, 3)
        assert f"side by side: {path}" in out


def test_sampled_episodes_repeat_with_their_seed(checkpoint_dir):
    config = EvalConfig(
        checkpoint_dir=str(checkpoint_dir), version=0, episodes=2, policy="sampled",
        max_episode_steps=30, seed=5,
    )  # fmt: skip
    first, again = evaluate(config), evaluate(config)
    other = evaluate(EvalConfig(**{**config.__dict__, "seed": 6}))
    rets = [[e.ret for e in r.results[0].episodes] for r in (first, again, other)]
    assert rets[0] == rets[1] and rets[0] != rets[2]
    assert [e.seed for e in first.results[0].episodes] == [5, 6]


def test_a_missing_version_is_named_with_the_ones_there(checkpoint_dir, capsys):
    rc = main(["eval", "--checkpoint-dir", str(checkpoint_dir), "--version", "7"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "no published version 7" in err and f"[0, {UPDATES}]" in err


def test_version_0_deleted_by_retention_is_rebuilt_from_the_seed(checkpoint_dir, tmp_path):
    """The learner keeps its newest versions only; version 0 is the seeded start every role
    builds, so it is evaluated from the seed, identical to the saved one."""
    import shutil

    import jax

    from openpi_rl.eval import load_version

    pruned = tmp_path / "checkpoints"
    shutil.copytree(checkpoint_dir / str(UPDATES), pruned / str(UPDATES))
    model = GaussianMLPConfig(obs_dim=4, action_dim=1)
    saved = load_version(checkpoint_dir, 0, model, (64, 64), seed=0)
    rebuilt = load_version(pruned, 0, model, (64, 64), seed=0)
    for a, b in zip(
        jax.tree.leaves(nnx.state(saved)), jax.tree.leaves(nnx.state(rebuilt)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    report = evaluate(EvalConfig(checkpoint_dir=str(pruned), version=0, episodes=1))
    assert (
        report.results[0].source == "seed" and report.as_dict()["versions"][0]["source"] == "seed"
    )
    with pytest.raises(ValueError, match=rf"no published version 1 \(versions: \[{UPDATES}\]"):
        load_version(pruned, 1, model, (64, 64))
