"""`openpi-rl replay export-lerobot` / `import-lerobot`: a real replay (ReplayWriter, camera
images, prompts, take-overs, operator events) to a LeRobot v3.0 dataset (pyarrow + PyAV) and
back, and imported demonstrations training the learner's behaviour-cloning term."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

from openpi_rl.daemon import Learner
from openpi_rl.replay import (
    ExportFilter,
    ReplayConfig,
    ReplayReader,
    ReplayWriter,
    export_lerobot,
    import_lerobot,
    records,
)
from openpi_rl.rl import PPOConfig
from tests.daemon.learner_helpers import learner_config

H, W = 32, 48  # camera image (even: yuv420p)
# Codec loss allowed on a camera frame (libsvtav1, crf 30, yuv420p) of smooth content.
MEAN_ABS_BOUND, MAX_ABS_BOUND = 3.0, 48
LEROBOT_CHECK = Path(__file__).with_name("lerobot_check.py")
LEROBOT_MAKE = Path(__file__).with_name("lerobot_make.py")


def camera(t: int, seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A smooth frame as a camera sees one: gradients and a bright disc moving with t."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = 8 + 3 * t + seed, 10 + 2 * t
    disc = 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 30.0)
    img = np.stack([xx * 3 + disc, yy * 4 + 40, 200 - xx * 2 + disc / 2], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


# (robot, episode, chunks, policy version, taken over at, ends with)
EPISODES = [
    ("r0", "e0", 6, 0, (), "success"),
    ("r0", "e1", 5, 1, (1, 2), "done"),
    ("r1", "e0", 4, 1, (), "truncated"),
    ("r1", "e1", 5, 2, (0, 1, 2, 3, 4), "success"),
]


def make_replay(root: Path) -> dict[tuple[str, str], list[dict]]:
    """A replay written as the server and bridge write it; returns what each chunk stored."""
    rng = np.random.default_rng(0)
    stored: dict[tuple[str, str], list[dict]] = {}
    w = ReplayWriter(ReplayConfig(path=root, commit_interval_s=0.01))
    try:
        for e, (robot, episode, n, version, takeover, end) in enumerate(EPISODES):
            for t in range(n):
                obs = {
                    "state": rng.standard_normal(3).astype(np.float32),
                    "image": camera(t, e),
                    "wrist": camera(t + 5, e, H + 16, W + 16),  # a second camera, its own size
                    "prompt_mask": np.array([True, True, t % 2 == 0, False]),
                }
                prompt = "balance the pole" if robot == "r0" else None
                actions = rng.standard_normal((2, 2)).astype(np.float32)
                logp, value = float(rng.standard_normal()), float(rng.standard_normal())
                tid = w.append_transition(
                    robot, episode, t, version, records.encode_observation(obs, prompt), actions,
                    actions, logp, value, t_mono=float(t),
                )  # fmt: skip
                last = t == n - 1
                executed = rng.standard_normal((2, 2)).astype(np.float32) if t in takeover else None
                reward = float(rng.uniform(-1, 1))
                w.report(tid, reward, done=last and end == "done", truncated=last and end ==
                         "truncated", executed_actions=executed, intervened=t in takeover)  # fmt: skip
                success = last and end == "success"
                if success:
                    w.add_reward_event(robot, "success", 1.0, transition_id=tid, wait=True)
                stored.setdefault((robot, episode), []).append(
                    dict(obs=obs, prompt=prompt, actions=actions, version=version, step=t,
                         executed=actions if executed is None else executed, value=value,
                         reward=reward + (1.0 if success else 0.0), logp=logp,
                         done=last and end in ("done", "success"), success=success,
                         truncated=last and end == "truncated", intervened=t in takeover)
                )  # fmt: skip
    finally:
        w.close()
    return stored


@pytest.fixture(scope="module")
def replay(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("lerobot") / "replay"
    return root, make_replay(root)


@pytest.fixture(scope="module")
def exported(replay, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "ds"
    with ReplayReader(replay[0]) as reader:
        export_lerobot(reader, out, fps=10)
    return out


def test_export_writes_the_v3_layout_with_every_number(replay, exported):
    _, stored = replay
    info = json.loads((exported / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert (info["total_episodes"], info["total_frames"], info["fps"]) == (4, 20, 10)
    feats = info["features"]
    assert feats["observation.images.image"]["shape"] == [H, W, 3]
    assert feats["observation.images.image"]["dtype"] == "video"
    assert feats["observation.images.wrist"]["shape"] == [H + 16, W + 16, 3]
    assert feats["observation.state"] == {"dtype": "float32", "shape": [3], "names": None}
    assert feats["action"]["shape"] == [2, 2]
    for p in ("meta/stats.json", "meta/tasks.parquet", "meta/episodes/chunk-000/file-000.parquet"):
        assert (exported / p).is_file(), p
    assert (exported / "videos/observation.images.image/chunk-000/file-000.mp4").stat().st_size
    data = pq.read_table(exported / "data/chunk-000/file-000.parquet").to_pylist()
    frames = [f for ep in stored.values() for f in ep]
    assert len(data) == len(frames)
    for row, f in zip(data, frames, strict=True):
        np.testing.assert_array_equal(np.float32(row["observation.state"]), f["obs"]["state"])
        np.testing.assert_array_equal(row["observation.prompt_mask"], f["obs"]["prompt_mask"])
        np.testing.assert_array_equal(np.float32(row["action"]), f["executed"])
        np.testing.assert_array_equal(np.float32(row["policy_action"]), f["actions"])
        assert (row["next.reward"], row["logp"], row["value"]) == (
            f["reward"], f["logp"], f["value"])  # fmt: skip
        assert (row["policy_version"], row["step"], row["intervened"]) == (
            f["version"], f["step"], f["intervened"])  # fmt: skip
        assert (row["next.done"], row["next.truncated"], row["next.success"]) == (
            f["done"], f["truncated"], f["success"])  # fmt: skip
    tasks = pq.read_table(exported / "meta/tasks.parquet").column("__index_level_0__").to_pylist()
    assert sorted(tasks) == ["", "balance the pole"]
    stats = json.loads((exported / "meta/stats.json").read_text())["observation.state"]
    states = np.stack([f["obs"]["state"] for f in frames]).astype(np.float64)
    for name, want in (
        ("min", states.min(0)),
        ("max", states.max(0)),
        ("mean", states.mean(0)),
        ("std", states.std(0)),
        ("q50", np.quantile(states, 0.5, axis=0)),
    ):
        np.testing.assert_allclose(stats[name], want, rtol=1e-6, atol=1e-6, err_msg=name)
    assert stats["count"] == [len(frames)]


def test_round_trip_keeps_every_number_and_every_frame_within_codec_loss(
    replay, exported, tmp_path
):
    _, stored = replay
    back = tmp_path / "back"
    result = import_lerobot(exported, back, keep_versions=True, episode_prefix="")
    assert (result.episodes, result.rows) == (4, 20)
    errs = []
    with ReplayReader(back) as reader:
        for (robot, episode), chunks in stored.items():
            rows = reader.transitions(robot_id=robot, episode_id=episode)
            assert len(rows) == len(chunks)
            for row, f in zip(rows, chunks, strict=True):
                obs = reader.stored_observation(row)
                np.testing.assert_array_equal(obs.arrays["state"], f["obs"]["state"])
                np.testing.assert_array_equal(obs.arrays["prompt_mask"], f["obs"]["prompt_mask"])
                assert obs.prompt == f["prompt"]
                np.testing.assert_array_equal(row.executed_actions, f["executed"])
                np.testing.assert_array_equal(row.actions, f["actions"])
                assert (row.policy_version, row.step) == (f["version"], f["step"])
                assert (row.reward, row.value) == (f["reward"], f["value"])
                assert (row.done, row.truncated) == (f["done"], f["truncated"])
                assert row.intervened  # imported: demonstrations, trained by BC
                for cam in ("image", "wrist"):
                    img = obs.arrays[cam]
                    assert img.shape == f["obs"][cam].shape and img.dtype == np.uint8
                    errs.append(np.abs(img.astype(int) - f["obs"][cam].astype(int)).ravel())
    err = np.concatenate(errs)
    assert err.mean() < MEAN_ABS_BOUND and err.max() <= MAX_ABS_BOUND, (err.mean(), err.max())


def test_filters_select_robot_versions_success_and_take_overs(replay, tmp_path):
    root, _ = replay

    def episodes(**flt) -> list[tuple[str, str]]:
        out = tmp_path / f"ds{len(list(tmp_path.iterdir()))}"
        with ReplayReader(root) as reader:
            export_lerobot(reader, out, ExportFilter(**flt), fps=10)
        eps = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet")
        return list(zip(eps.column("robot_id").to_pylist(),
                        eps.column("source_episode_id").to_pylist(), strict=True))  # fmt: skip

    assert episodes(robot="r1") == [("r1", "e0"), ("r1", "e1")]
    assert episodes(min_version=1, max_version=1) == [("r0", "e1"), ("r1", "e0")]
    assert episodes(success_only=True) == [("r0", "e0"), ("r1", "e1")]
    assert episodes(takeovers_only=True) == [("r0", "e1"), ("r1", "e1")]
    assert episodes(robot="r1", takeovers_only=True, success_only=True) == [("r1", "e1")]
    with pytest.raises(ValueError, match="no stored chunk matches"):
        episodes(robot="r0", takeovers_only=True, success_only=True)


def test_clear_errors(replay, exported, tmp_path):
    root, _ = replay
    with ReplayReader(root) as reader:
        with pytest.raises(ValueError, match="robot: 'nobody' has no stored chunks"):
            export_lerobot(reader, tmp_path / "a", ExportFilter(robot="nobody"))
        with pytest.raises(ValueError, match="no stored chunk matches"):
            export_lerobot(reader, tmp_path / "b", ExportFilter(min_version=7))
        with pytest.raises(FileExistsError, match="already exists"):
            export_lerobot(reader, exported)
    with pytest.raises(FileNotFoundError, match="not a LeRobot dataset"):
        import_lerobot(tmp_path, tmp_path / "r")


def test_cli_exports_with_filters_and_imports(replay, tmp_path):
    root, _ = replay
    out, back = tmp_path / "ds", tmp_path / "back"
    cli = [sys.executable, "-m", "openpi_rl.cli", "replay"]
    run = lambda *a: subprocess.run([*cli, *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    done = run("export-lerobot", str(root), str(out), "--robot", "r0", "--success-only")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["frames"] == 6
    again = run("export-lerobot", str(root), str(out))
    assert again.returncode != 0 and "already exists" in again.stderr
    done = run("import-lerobot", str(out), str(back), "--policy-version", "5")
    assert done.returncode == 0, done.stderr
    with ReplayReader(back) as reader:
        rows = reader.transitions()
    assert len(rows) == 6 and {r.policy_version for r in rows} == {5}
    assert {(r.robot_id, r.episode_id) for r in rows} == {("r0", "demo-e0")}


def test_imported_demonstrations_move_the_policy_toward_them(tmp_path):
    """Demonstrations exported from one replay and imported into the learner's: one update
    raises the policy's log-prob of the demonstrated chunks (the BC term take-overs use)."""
    rng = np.random.default_rng(1)
    target = np.full((2, 2), 0.8, np.float32)
    src = tmp_path / "demos"
    w = ReplayWriter(ReplayConfig(path=src, commit_interval_s=0.01))
    states = []
    for e in range(3):
        for t in range(5):
            states.append(rng.standard_normal(3).astype(np.float32))
            zero = np.zeros((2, 2), np.float32)
            tid = w.append_transition(
                "teleop", f"e{e}", t, 0, records.encode_observation({"state": states[-1]}), zero,
                None, 0.0, 0.0, t_mono=float(t),
            )  # fmt: skip
            w.report(tid, 0.0, done=t == 4, truncated=False, executed_actions=target,
                     intervened=True)  # fmt: skip
    w.close()
    ds = tmp_path / "ds"
    with ReplayReader(src) as reader:
        export_lerobot(reader, ds, fps=10)
    config = learner_config(
        tmp_path, ppo=PPOConfig(lr=1e-2, train_iters=4, minibatch_size=16, bc_coef=1.0,
                                entropy_coef=0.0), max_kl=None)  # fmt: skip
    import_lerobot(ds, Path(config.replay_dir))
    learner = Learner(config)
    try:
        obs = {"state": jnp.asarray(np.stack(states))}
        demo = jnp.broadcast_to(jnp.asarray(target), (len(states), 2, 2))
        key = jax.random.key(0)
        before = np.asarray(learner.ac.model.policy_logprobs(key, obs, demo))
        result = learner.step()
        assert result is not None and result.published
        after = np.asarray(learner.ac.model.policy_logprobs(key, obs, demo))
        assert after.mean() > before.mean() + 0.5, (before.mean(), after.mean())
        assert result.metrics["bc_loss"] > 0
    finally:
        learner.close()


def test_lerobot_loads_the_export(replay, exported, lerobot_python, tmp_path):
    """The registry's LeRobot package (its own venv: it needs torch) opens the export with
    `LeRobotDataset`: frame count, fps and feature shapes as declared, every number as stored,
    every camera frame (decoded by LeRobot's video backend) within the codec's loss."""
    _, stored = replay
    frames = [f for ep in stored.values() for f in ep]
    npz = tmp_path / "frames.npz"
    done = subprocess.run(
        [lerobot_python, str(LEROBOT_CHECK), str(exported), str(npz)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert (report["frames"], report["episodes"], report["fps"]) == (20, 4, 10)
    assert report["shapes"]["observation.images.image"] == [3, H, W]  # LeRobot: channels first
    assert report["shapes"]["observation.images.wrist"] == [3, H + 16, W + 16]
    assert report["shapes"]["observation.state"] == [3]
    assert report["shapes"]["action"] == [2, 2]
    got = report["numbers"]
    np.testing.assert_array_equal(got["observation.state"], [f["obs"]["state"] for f in frames])
    np.testing.assert_array_equal(got["action"], [f["executed"] for f in frames])
    # The file holds float64; LeRobot's loader hands every float out as a float32 tensor.
    np.testing.assert_array_equal(
        np.float32(got["next.reward"]), np.float32([f["reward"] for f in frames])
    )
    assert report["tasks"] == [f["prompt"] or "" for f in frames]
    decoded = np.load(npz)
    err = np.concatenate([
        np.abs(decoded[f"observation.images.{cam}"].astype(int)
               - np.stack([f["obs"][cam] for f in frames]).astype(int)).ravel()
        for cam in ("image", "wrist")
    ])  # fmt: skip
    assert err.mean() < MEAN_ABS_BOUND and err.max() <= MAX_ABS_BOUND, (err.mean(), err.max())


def test_a_dataset_lerobot_wrote_imports_as_demonstrations(lerobot_python, tmp_path):
    """A dataset written by the registry's LeRobot itself (`LeRobotDataset.create`, its own
    parquet and AV1 video, single-step actions, no openpi-rl columns) imports: every number as
    written, actions as chunks [1, D], tasks as prompts, frames within the codec's loss."""
    ds, npz = tmp_path / "teleop", tmp_path / "made.npz"
    done = subprocess.run(
        [lerobot_python, str(LEROBOT_MAKE), str(ds), str(npz)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    made = np.load(npz)
    result = import_lerobot(ds, tmp_path / "replay")
    assert (result.episodes, result.rows, result.policy_version) == (2, 9, 0)
    with ReplayReader(tmp_path / "replay") as reader:
        rows = reader.transitions()
        stored = [reader.stored_observation(r) for r in rows]
    assert [(r.robot_id, r.episode_id, r.step) for r in rows] == [
        ("lerobot", f"demo-{e}", t) for e, n in ((0, 5), (1, 4)) for t in range(n)
    ]
    np.testing.assert_array_equal([o.arrays["state"] for o in stored], made["state"])
    np.testing.assert_array_equal([r.executed_actions for r in rows], made["action"][:, None])
    assert [r.reward for r in rows] == made["reward"].ravel().tolist()
    assert [r.done for r in rows] == made["done"].ravel().tolist()
    assert all(r.intervened for r in rows)
    assert [o.prompt for o in stored] == ["pick the cube"] * 5 + ["place the cube"] * 4
    err = np.abs(np.stack([o.arrays["cam"] for o in stored]).astype(int) - made["cam"].astype(int))
    assert err.mean() < MEAN_ABS_BOUND and err.max() <= MAX_ABS_BOUND, (err.mean(), err.max())


def test_demonstrations_join_a_token_policys_replay(tmp_path):
    """Imported into a replay whose rows hold a token policy's action tokens, demonstrations
    (actions only) get placeholder tokens of that shape (out of the ratio), so both train in
    one batch: the update is finite and its BC term sees them."""
    from openpi_rl.models.choice import build_actor_critic
    from openpi_rl.models.pi0_fast import Pi0FASTConfig
    from tests.daemon.learner_helpers import Recorder

    model = Pi0FASTConfig(
        variant="dummy", action_horizon=2, action_dim=2, state_dim=3, image_keys=(), prompt_len=4
    )
    config = learner_config(
        tmp_path, model=model, ppo=PPOConfig(lr=1e-4, train_iters=1, minibatch_size=16, bc_coef=1.0),
        max_kl=None,
    )  # fmt: skip
    rec = Recorder(Path(config.replay_dir), ac=build_actor_critic(model, (16, 16), 0))
    obs = {k: np.asarray(v)[0] for k, v in model.fake_obs(1).items()}
    for t in range(4):
        tid, _ = rec.serve("r", "e0", t, obs)
        rec.writer.report(tid, 0.1, done=t == 3, truncated=False)
    rec.close()
    with ReplayReader(Path(config.replay_dir)) as reader:
        tokens = reader.transitions()[0].policy_actions
    assert tokens.shape != (2, 2)  # the token policy stores tokens, not actions
    src = tmp_path / "teleop"
    w = ReplayWriter(ReplayConfig(path=src, commit_interval_s=0.01))
    demo = np.full((2, 2), 0.5, np.float32)
    for t in range(4):
        tid = w.append_transition("arm", "d0", t, 0, records.encode_observation(obs), demo, None,
                                  0.0, 0.0, t_mono=float(t))  # fmt: skip
        w.report(tid, 0.0, done=t == 3, truncated=False, executed_actions=demo, intervened=True)
    w.close()
    with ReplayReader(src) as reader:
        export_lerobot(reader, tmp_path / "ds", fps=10)
    import_lerobot(tmp_path / "ds", Path(config.replay_dir))
    with ReplayReader(Path(config.replay_dir)) as reader:
        demos = reader.transitions(robot_id="arm")
    assert len(demos) == 4 and all(r.intervened for r in demos)
    assert all(r.policy_actions.shape == tokens.shape for r in demos)
    learner = Learner(config)
    try:
        result = learner.step()
        assert result is not None and result.published and result.metrics["finite"] == 1.0
        assert result.metrics["bc_loss"] > 0
    finally:
        learner.close()
