"""Mean return per policy version from a real store: what the pendant's chart plots."""

import contextlib
import time

import numpy as np
import pytest

from openpi_rl.replay import ReplayConfig, ReplayWriter, store
from openpi_rl.replay.returns import VersionReturn, mean_return_per_version


def _episode(w: ReplayWriter, robot: str, episode: str, versions: list[int], rewards, end=True):
    """One episode: a transition per version in `versions`, each reported with its reward, the
    last one done when `end`. Returns the transition ids."""
    ids = []
    for step, (version, reward) in enumerate(zip(versions, rewards, strict=True)):
        tid = w.append_transition(
            robot, episode, step, version, b"obs", np.zeros(2, np.float32), None, 0.0, 0.0, 0.0
        )
        last = end and step == len(versions) - 1
        w.report(tid, reward, done=last, truncated=False).result(10)
        ids.append(tid)
    return ids


def test_one_mean_per_version_over_ended_single_version_episodes_with_their_events(
    replay_location,
):
    with ReplayConfig(path=replay_location, commit_interval_s=0.01).create() as w:
        _episode(w, "a", "e1", [1, 1], [1.0, 2.0])  # return 3
        _episode(w, "b", "e2", [1, 1, 1], [0.0, 0.0, 1.0])  # return 1
        ids = _episode(w, "a", "e3", [2, 2], [1.0, 1.0])  # return 2, +5 and -1 from operators
        _episode(w, "a", "e4", [2, 3], [10.0, 10.0])  # straddles a swap: no version's
        _episode(w, "b", "e5", [3], [7.0], end=False)  # still running: not yet
        for key, (tid, value) in enumerate([(ids[0], 5.0), (ids[1], -1.0)]):
            w.submit_reward_event("a", "step_reward", value, "ana", time.time(), f"k{key}", tid)
        w.submit_reward_event("a", "step_reward", 100.0, "ana", time.time(), "unattached")
        w.flush()
        conn = store.connect(replay_location)
        try:
            got = mean_return_per_version(conn)
            assert got == [VersionReturn(1, 2, 2.0), VersionReturn(2, 1, 6.0)]
            # The window: only the newest ended episode (e4, mixed) -> nothing; e3 and e4 -> v2.
            assert mean_return_per_version(conn, last_episodes=1) == []
            assert mean_return_per_version(conn, last_episodes=2) == [VersionReturn(2, 1, 6.0)]
            with pytest.raises(ValueError, match="last_episodes"):
                mean_return_per_version(conn, last_episodes=0)
        finally:
            conn.close()


def test_the_newest_episodes_are_newest_by_time_when_servers_share_a_database(pg_url):
    """Ids order by writer (boot epoch), not time: the window must follow serving time."""
    first = ReplayConfig(path=pg_url, commit_interval_s=0.01).create()  # boot epoch 1
    second = ReplayConfig(path=pg_url, commit_interval_s=0.01).create()  # epoch 2: larger ids
    try:
        _episode(second, "b", "old", [1], [1.0])
        _episode(first, "a", "new", [2], [5.0])  # later, but with smaller ids
        with contextlib.closing(store.connect(pg_url)) as conn:
            assert mean_return_per_version(conn, last_episodes=1) == [VersionReturn(2, 1, 5.0)]
    finally:
        first.close()
        second.close()
