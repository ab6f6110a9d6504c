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


def test_robot_episodes_from_a_replay_with_cameras_verdicts_and_versions(tmp_path):
    """Which stored episodes count for a version, their success (the operator's verdict first,
    else the time limit on a survival task) and return (rewards + feedback values), and their
    video: one frame per chunk, the two cameras side by side, decoded back from the mp4."""
    from openpi_rl.eval import VideoWriter, read_frames
    from openpi_rl.eval.robots import episode_frames, finished_episodes
    from openpi_rl.replay import ReplayConfig, ReplayWriter, records

    h, w = 32, 48
    # (robot, episode, versions per chunk, ends with, operator's verdict)
    episodes = [
        ("r0", "a", (1, 1, 1), "truncated", None),
        ("r0", "b", (1, 1, 1, 1), "done", "success"),
        ("r1", "c", (0, 0, 0), "done", None),
        ("r1", "d", (1, 2), "done", None),  # straddles a swap: counts for no version
    ]
    writer = ReplayWriter(ReplayConfig(path=tmp_path / "replay", commit_interval_s=0.01))
    try:
        for robot, episode, versions, end, verdict in episodes:
            for t, version in enumerate(versions):
                obs = {
                    "state": np.zeros(3, np.float32),
                    "image": np.full((h, w, 3), 40 * t, np.uint8),
                    "wrist": np.full((h, w, 3), 200, np.uint8),
                }
                actions = np.zeros((2, 2), np.float32)
                tid = writer.append_transition(
                    robot, episode, t, version, records.encode_observation(obs, None), actions,
                    actions, 0.0, 0.0, t_mono=0.1 * t,
                )  # fmt: skip
                last = t == len(versions) - 1
                writer.report(tid, 1.0, done=last and end == "done",
                              truncated=last and end == "truncated")  # fmt: skip
                if last and verdict is not None:
                    writer.add_reward_event(robot, verdict, 0.5, transition_id=tid, wait=True)
    finally:
        writer.close()
    with ReplayReader(tmp_path / "replay") as reader:
        v1 = finished_episodes(reader, 1, since_id=0, survival=True)
        v0 = finished_episodes(reader, 0, since_id=0, survival=True)
        assert [e.episode_id for e in v1] == ["a", "b"] and [e.episode_id for e in v0] == ["c"]
        a, b = (e.result for e in v1)
        assert (a.success, a.ret, a.length, a.truncated) == (True, 3.0, 3, True)  # time limit
        assert (b.success, b.ret, b.length, b.terminated) == (True, 4.5, 4, True)  # the verdict
        assert v0[0].result.success is False  # fell, no verdict
        assert (
            finished_episodes(reader, 1, since_id=v1[0].last_transition, survival=True)[0] == v1[1]
        )
        frames, fps = episode_frames(reader, v1[1])
    assert len(frames) == 4 and frames[0].shape == (h, 2 * w, 3) and fps == pytest.approx(10.0)
    with VideoWriter(tmp_path / "b.mp4", fps) as video:
        for frame in frames:
            video.write(frame)
    decoded = read_frames(tmp_path / "b.mp4")
    assert len(decoded) == 4
    assert np.abs(decoded[3][:, :w].astype(int) - 120).mean() < 4  # "image" at chunk 3
    assert np.abs(decoded[3][:, w:].astype(int) - 200).mean() < 4  # "wrist"
