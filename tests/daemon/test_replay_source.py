"""Reading training data from a real replay: rewards with operator events, episode ends, cuts of
long open episodes, the batch layout, policy-lag drops and the consumed flag."""

import sqlite3
import time

import numpy as np
import pytest
from learner_helpers import MODEL, learner_config

from openpi_rl.daemon import Learner, ReplaySource, build_batch, split_episode
from openpi_rl.replay import ReplayConfig, ReplayReader, ReplayWriter
from openpi_rl.rl.rl_api import ArraySpec


def _events(rec, robot, *pairs):
    for tid, kind, value in pairs:
        rec.writer.add_reward_event(robot, kind, value, transition_id=tid, wait=True)


@pytest.mark.parametrize("recorder", ["sqlite", "postgres"], indirect=True)
def test_segments_and_batch_from_several_robots(recorder):
    rng = np.random.default_rng(0)
    a = recorder.episode("arm-1", "a", 4, rng, end=None)  # closed by a success verdict
    recorder.episode("arm-1", "b", 3, rng, end="done")
    c = recorder.episode("arm-2", "c", 5, rng, end="truncated")
    d = recorder.episode("arm-2", "d", 20, rng, end=None)  # open: cut into segments of 8
    e = recorder.episode("arm-3", "e", 3, rng, end=None)  # operator ended it: a time limit
    recorder.episode("arm-3", "f", 5, rng, end=None)  # open and short: waits
    _events(
        recorder, "arm-1", (a[1], "step_reward", 0.5), (a[1], "step_reward", -0.2),
        (a[3], "success", 1.0),
    )  # fmt: skip
    _events(recorder, "arm-3", (e[2], "end_episode", 0.0))
    recorder.writer.flush()

    source = ReplaySource(recorder.location)
    got = source.collect(min_version=0, segment_length=8)
    by_episode = {}
    for seg in got.segments:
        by_episode.setdefault(seg.episode_id, []).append(seg)
    assert sorted(by_episode) == ["a", "b", "c", "d", "e"]  # f waits for more chunks
    assert got.stale_ids == []

    (sa,) = by_episode["a"]
    np.testing.assert_allclose([s.reward for s in sa.steps], [0.1, 0.4, 0.1, 1.1], rtol=1e-6)
    assert [s.done for s in sa.steps] == [False, False, False, True] and sa.bootstrap is None
    (sb,) = by_episode["b"]
    assert sb.steps[-1].done and not sb.steps[-1].time_limit
    (sc,) = by_episode["c"]
    assert sc.steps[-1].time_limit and not sc.steps[-1].done and sc.bootstrap is None
    (se,) = by_episode["e"]
    assert se.steps[-1].time_limit and se.ids == e
    d1, d2 = by_episode["d"]
    assert d1.ids == d[:8] and d2.ids == d[8:16]  # the last 4 wait for the episode to go on
    assert d1.bootstrap.id == d[8] and d2.bootstrap.id == d[16]

    segs = sorted(got.segments, key=lambda s: s.steps[0].row.id)
    spec = {"state": ArraySpec((MODEL.obs_dim,), "float32")}
    batch = build_batch(segs, source.observation, spec, (2, 2), 8, 8)
    assert batch.obs["state"].shape == (8, 8, 3) and batch.boot_obs["state"].shape == (8, 3)
    assert batch.valid.sum() == 4 + 3 + 5 + 16 + 3
    np.testing.assert_array_equal(batch.valid.sum(0)[:6], [len(s) for s in segs])
    col_d1 = next(i for i, s in enumerate(segs) if s.ids == d[:8])
    rows = {r.id: r for r in source.reader.transitions()}
    boot_obs = source.observation(rows[d[8]])["state"]
    np.testing.assert_array_equal(batch.boot_obs["state"][col_d1], boot_obs)
    col_c = next(i for i, s in enumerate(segs) if s.ids == c)  # time limit: its own observation
    np.testing.assert_array_equal(
        batch.boot_obs["state"][col_c], source.observation(rows[c[-1]])["state"]
    )
    np.testing.assert_array_equal(batch.logp[: len(c), col_c], [rows[i].logp for i in c])
    assert batch.ends[len(c) - 1, col_c] and not batch.dones[len(c) - 1, col_c]
    source.close()


def test_split_episode_drops_stale_prefix_and_waits_for_settled_steps(recorder, tmp_path):
    rng = np.random.default_rng(1)
    ids = recorder.episode("r", "x", 3, rng, version=0, end=None)
    ids += recorder.episode("r", "x", 12, rng, version=3, end=None)
    recorder.writer.flush()
    source = ReplaySource(tmp_path / "replay")
    # Open episode: only full segments, and the step after each one stays for its bootstrap.
    assert [seg.ids for seg in source.collect(-10, 7).segments] == [ids[:7], ids[7:14]]
    assert source.collect(-10, 100).segments == []
    rows = {r.id: r for r in source.reader.transitions()}
    from openpi_rl.daemon import Step

    steps = [Step(rows[i], 0.0, False, False) for i in ids]
    segs, stale = split_episode(steps, False, min_version=2, segment_length=4, settled=15)
    assert stale == ids[:3]
    assert [s.ids for s in segs] == [ids[3:7], ids[7:11]]  # 11..14: one short of 4 + bootstrap
    segs, _ = split_episode(steps, False, min_version=2, segment_length=4, settled=8)
    assert [s.ids for s in segs] == [ids[3:7]]  # steps 8.. are too recent
    segs, _ = split_episode(steps, True, min_version=2, segment_length=4, settled=0)
    assert [s.ids for s in segs] == [ids[3:7], ids[7:11], ids[11:15]]
    assert segs[-1].bootstrap is None and segs[0].bootstrap.id == ids[7]
    source.close()


@pytest.mark.parametrize("recorder", ["sqlite", "postgres"], indirect=True)
def test_learner_marks_consumed_and_drops_stale_data_counted(tmp_path, recorder):
    rng = np.random.default_rng(2)
    first = recorder.episode("r", "a", 5, rng, version=0)
    recorder.writer.flush()
    learner = Learner(learner_config(tmp_path, max_policy_lag=0, replay_dir=recorder.location))
    try:
        assert learner.step().version == 1
        stale = recorder.episode("r", "b", 4, rng, version=0)  # served by version 0: stale now
        fresh = recorder.episode("r", "c", 6, rng, version=1)
        tail = recorder.episode("r", "d", 3, rng, version=1, end=None)  # open: waits
        recorder.writer.flush()
        result = learner.step()
        assert result.published and result.transitions == len(fresh)
        assert learner.counters["transitions_stale"] == len(stale)
        assert learner.counters["transitions_trained"] == len(first) + len(fresh)
        with ReplayReader(recorder.location) as reader:
            consumed = {r.id: r.consumed for r in reader.transitions()}
        assert all(consumed[i] for i in first + stale + fresh)
        assert not any(consumed[i] for i in tail)
        assert learner.step() is None  # nothing new to take
    finally:
        learner.close()


def test_an_episode_the_robot_ended_waits_settle_s_for_the_operators_verdict(tmp_path, recorder):
    rng = np.random.default_rng(1)
    a = recorder.episode("arm-1", "a", 3, rng, end="done")  # the robot ended it just now
    b = recorder.episode("arm-1", "b", 2, rng, end=None)
    _events(recorder, "arm-1", (b[1], "failure", -1.0))  # the operator closed this one
    recorder.writer.flush()
    source = ReplaySource(tmp_path / "replay")
    got = source.collect(min_version=0, segment_length=8, settle_s=30.0)
    assert [seg.episode_id for seg in got.segments] == ["b"]  # a waits for a verdict
    _events(recorder, "arm-1", (a[2], "success", 1.0))  # pressed after the end: not lost
    recorder.writer.flush()
    later = source.collect(min_version=0, segment_length=8, settle_s=30.0, now=time.time() + 31)
    (sa,) = [seg for seg in later.segments if seg.episode_id == "a"]
    assert sa.ids == a and sa.steps[-1].done and sa.steps[-1].reward > 1.0 - 1e-6
    source.close()


def test_a_stored_infinite_reward_is_clipped_so_learning_never_stalls(tmp_path):
    with ReplayWriter(ReplayConfig(path=tmp_path)) as w:
        for t in range(3):
            obs = np.zeros(10, np.uint8).tobytes()
            w.append_transition(
                "r", "e", t, 0, obs, np.zeros((2, 1), np.float32), None, 0.0, 0.0, t
            )
    # A store written before rewards were clamped: two 1e308 reports summed to inf.
    conn = sqlite3.connect(tmp_path / "replay.sqlite")
    conn.execute("UPDATE transitions SET reward = 1e308 * 10 WHERE step = 1")
    conn.execute("UPDATE transitions SET reward = -1e308 * 10, done = 1 WHERE step = 2")
    conn.commit()
    conn.close()
    (seg,) = ReplaySource(tmp_path).collect(min_version=0, segment_length=8).segments
    assert [s.reward for s in seg.steps] == [0.0, 1e6, -1e6]


def test_segments_come_oldest_first_across_servers_on_one_database(pg_url):
    """Servers on one PostgreSQL replay number their rows from their own boot epochs, so ids do
    not order them: the server that opened first would otherwise fill every batch while the
    others' data goes stale. Here the one opened last serves first, and its episode comes first."""
    opened_first = ReplayConfig(path=pg_url, commit_interval_s=0.01).create()  # the lower ids
    opened_last = ReplayConfig(path=pg_url, commit_interval_s=0.01).create()
    actions = np.zeros((2, 2), np.float32)
    ids = {}
    try:
        for writer, robot in ((opened_last, "b0"), (opened_first, "a0")):
            ids[robot] = [
                writer.append_transition(robot, "e", t, 0, b"x", actions, None, 0.0, 0.0, t)
                for t in range(3)
            ]
            writer.report(ids[robot][-1], 1.0, done=True, truncated=False)
            writer.flush()
            time.sleep(0.01)  # serving times apart
    finally:
        opened_first.close()
        opened_last.close()
    assert ids["a0"][0] < ids["b0"][0]
    source = ReplaySource(pg_url)
    try:
        got = source.collect(min_version=0, segment_length=8)
    finally:
        source.close()
    assert [(s.robot_id, s.ids) for s in got.segments] == [("b0", ids["b0"]), ("a0", ids["a0"])]
