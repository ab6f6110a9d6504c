"""`openpi-rl eval --robots`: a version pinned on a real policy server through its admin
endpoint, judged by the episodes robots on real sockets finish with it (read from the real
replay), the pin put back afterwards; and the stored camera images a robot video is made of."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from openpi_rl.eval import EvalConfig, evaluate, report_table
from openpi_rl.eval.robots import image_arrays
from openpi_rl.models.choice import build_actor_critic
from openpi_rl.replay import ReplayReader
from openpi_rl.weights import VersionCheckpoints
from tests._net import free_port
from tests.service.service_helpers import MODEL, TOKEN, VALUE_HIDDEN, Robots, ServerRig

STEPS = 4  # chunks per robot episode (the last one reported done)


def test_robots_eval_pins_each_version_and_reads_its_episodes_from_the_replay(tmp_path):
    ac = build_actor_critic(MODEL, VALUE_HIDDEN, 0)
    checkpoints = VersionCheckpoints(tmp_path / "ckpt", None)
    checkpoints.save(0, nnx.state(ac), {"step": np.zeros(())}, {})
    rng = np.random.default_rng(1)
    moved = jax.tree.map(
        lambda x: x + 0.5 * rng.standard_normal(x.shape, np.float32), nnx.state(ac)
    )
    checkpoints.save(1, moved, {"step": np.zeros(())}, {})
    checkpoints.close()
    rig = ServerRig(tmp_path, free_port())
    robots = Robots(rig.endpoint, n=2, steps=STEPS, hz=200.0)
    try:
        assert rig.admin_call("status")["status"]["pinned"] is None
        config = EvalConfig(
            checkpoint_dir=str(tmp_path / "ckpt"), version=1, compare=0, episodes=3,
            robots=True, admin_endpoint=rig.admin.endpoint, admin_token=TOKEN,
            replay_dir=str(tmp_path / "replay"), robots_timeout_s=60, model=MODEL,
            value_hidden=VALUE_HIDDEN,
        )  # fmt: skip
        report = evaluate(config)
        # The pin is as it was: the server follows the learner again.
        assert rig.admin_call("status")["status"]["pinned"] is None
    finally:
        robots.stop()
        rig.close()
    assert robots.failures == []
    assert [r.version for r in report.results] == [1, 0]
    with ReplayReader(tmp_path / "replay") as reader:
        rows = reader.transitions()
    by_episode: dict[str, list] = {}
    for row in rows:
        by_episode.setdefault(row.episode_id, []).append(row)
    for r in report.results:
        assert r.summary.episodes == 3 and len(r.episodes) == 3
        for e in r.episodes:
            assert e.length == STEPS and e.terminated and e.success is False  # done: it fell
    # Each counted episode was served wholly by its version; returns are the reported rewards.
    counted = {
        v: sorted(round(sum(x.reward for x in eps), 5) for eps in by_episode.values()
                  if len(eps) == STEPS and {x.policy_version for x in eps} == {v})
        for v in (0, 1)
    }  # fmt: skip
    for r in report.results:
        mine = [round(e.ret, 5) for e in r.episodes]
        assert set(mine) <= set(counted[r.version]), (mine, counted[r.version])
    assert "robots through" in report_table(report).title


def test_image_arrays_finds_the_cameras_of_a_stored_observation():
    hwc = np.full((16, 20, 3), 200, np.uint8)
    chw = np.full((3, 16, 20), -1.0, np.float32)  # openpi's [-1, 1] floats, channels first
    chw[0], chw[1] = 1.0, 0.0
    gray = np.full((16, 20, 1), 0.5, np.float32)
    obs = {
        "base": hwc,
        "wrist": chw,
        "depth": gray,
        "state": np.zeros(7),
        "tokens": np.zeros((1, 48, 2)),
    }
    images = image_arrays(obs)
    assert sorted(images) == ["base", "depth", "wrist"]
    assert all(x.dtype == np.uint8 and x.shape == (16, 20, 3) for x in images.values())
    assert images["wrist"][0, 0].tolist() == [255, 128, 0]
    assert images["depth"][0, 0].tolist() == [128, 128, 128]
    np.testing.assert_array_equal(images["base"], hwc)


def test_robots_eval_needs_the_admin_token(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENPI_RL_ADMIN_TOKEN", raising=False)
    checkpoints = VersionCheckpoints(tmp_path / "ckpt", None)
    checkpoints.save(
        0, nnx.state(build_actor_critic(MODEL, VALUE_HIDDEN, 0)), {"s": np.zeros(())}, {}
    )
    checkpoints.close()
    with pytest.raises(ValueError, match="no admin token"):
        evaluate(EvalConfig(checkpoint_dir=str(tmp_path / "ckpt"), robots=True))
