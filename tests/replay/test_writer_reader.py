"""What the policy server, reward bridge and learner rely on from ReplayWriter / ReplayReader."""

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from openpi_rl.replay import (
    CorruptRecord,
    ReplayClosed,
    ReplayConfig,
    ReplayFull,
    ReplayReader,
    ReplayWriter,
    stats_main,
)
from openpi_rl.replay.writer import SEQ_BITS


def _obs(i: int, size: int = 2000) -> bytes:
    return np.random.default_rng(i).bytes(size)


def _append(w: ReplayWriter, i: int, robot="r0", episode="e0", version=1, size=2000) -> int:
    actions = np.full((4, 2), i, np.float32)
    return w.append_transition(
        robot, episode, i, version, _obs(i, size), actions, actions + 0.5, -float(i), 0.1 * i, i
    )


def test_append_report_close_then_reader_sees_everything(replay_location):
    loc = replay_location
    with ReplayConfig(path=loc).create() as w:
        ids = [
            _append(w, i, robot=f"r{i % 2}", episode=f"e{i // 4}", version=i // 5)
            for i in range(10)
        ]
        w.report(ids[3], 1.0, done=False, truncated=False)
        w.report(ids[3], 2.5, done=True, truncated=False)
        w.report(
            ids[7],
            -1.0,
            done=False,
            truncated=True,
            executed_actions=np.ones((4, 2)),
            intervened=True,
        )

    with ReplayReader(loc) as r:
        rows = r.transitions()
        assert [row.id for row in rows] == ids
        assert rows[3].reward == 3.5 and rows[3].done and not rows[3].truncated
        assert rows[7].reward == -1.0 and rows[7].truncated and rows[7].intervened
        np.testing.assert_array_equal(rows[7].executed_actions, np.ones((4, 2)))
        assert rows[0].reward == 0.0 and not rows[0].done and rows[0].executed_actions is None
        for i, row in enumerate(rows):
            assert r.observation_bytes(row) == _obs(i)
            np.testing.assert_array_equal(row.actions, np.full((4, 2), i, np.float32))
            np.testing.assert_array_equal(row.policy_actions, np.full((4, 2), i + 0.5, np.float32))
            assert (row.step, row.logp, row.t_mono) == (i, -float(i), float(i))
        assert [x.id for x in r.transitions(robot_id="r1")] == ids[1::2]
        assert [x.id for x in r.transitions(robot_id="r0", episode_id="e1")] == [ids[4], ids[6]]
        assert [x.id for x in r.transitions(policy_version=1)] == ids[5:10]
        assert [x.id for x in r.transitions(since_id=ids[7])] == ids[8:]
        assert [x.id for x in r.transitions(limit=3)] == ids[:3]
        eps = {(e["robot_id"], e["episode_id"]): e for e in r.episodes()}
        assert eps[("r1", "e0")]["ep_return"] == 3.5 and eps[("r1", "e0")]["ended"]
        assert eps[("r0", "e0")]["steps"] == 2 and not eps[("r0", "e0")]["ended"]
        s = r.stats()
        assert (s.rows, s.episodes, s.per_robot) == (10, 6, {"r0": 5, "r1": 5})
        assert s.bytes_total >= 10 * 2000 and s.bytes_total == s.bytes_db + s.bytes_segments
        assert r.integrity_check() == "ok"


def test_ids_increase_and_never_repeat_across_reopen_even_uncommitted(replay_location):
    loc = replay_location
    # A writer hands out ids and is killed before committing any of them (commit interval 60 s).
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np
        from openpi_rl.replay import ReplayConfig
        w = ReplayConfig(path={loc!r}, commit_interval_s=60).create()
        a = np.zeros(2, np.float32)
        print([w.append_transition("r", "e", i, 0, b"x", a, None, 0, 0, 0) for i in range(5)], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    lost = json.loads(out.stdout.strip().splitlines()[-1])
    assert lost == sorted(set(lost))

    with ReplayConfig(path=loc).create() as w:
        ids = [_append(w, i) for i in range(5)]
        ev = w.add_reward_event("r0", "step_reward", 1.0, wait=True)
    assert ids == sorted(set(ids)) and ev > ids[-1]
    assert min(ids) > max(lost) and not set(ids) & set(lost)
    with ReplayConfig(path=loc).create() as w:
        later = _append(w, 0)
    assert later > ev and later >> SEQ_BITS == (ids[0] >> SEQ_BITS) + 1


def test_rows_commit_within_interval_without_close(replay_location):
    with ReplayConfig(path=replay_location, commit_interval_s=0.05).create() as w:
        for i in range(20):
            _append(w, i)
        r = ReplayReader(replay_location)
        deadline = time.monotonic() + 2.0
        while r.count() < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert r.count() == 20
        r.close()


def test_reader_in_another_process_sees_committed_rows_while_writer_runs(replay_location):
    loc = replay_location
    w = ReplayConfig(path=loc).create()
    try:
        ids = [_append(w, i) for i in range(30)]
        w.flush()
        script = textwrap.dedent(
            f"""
            import json
            from openpi_rl.replay import ReplayReader
            r = ReplayReader({loc!r})
            rows = r.transitions()
            print(json.dumps([r.count(), [x.id for x in rows], [len(r.observation_bytes(x)) for x in rows]]))
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        )
        count, seen, sizes = json.loads(out.stdout.strip().splitlines()[-1])
        assert count == 30 and seen == ids and sizes == [2000] * 30
        _append(w, 30)  # the writer keeps going after being read
        w.flush()
        assert ReplayReader(loc).count() == 31
    finally:
        w.close()


def test_reward_event_wait_is_visible_on_return_and_deduplicated(replay_location):
    with ReplayConfig(path=replay_location, commit_interval_s=10.0).create() as w:
        r = ReplayReader(replay_location)
        t0 = time.monotonic()
        eid = w.add_reward_event(
            "r0", "success", 1.0, operator="ana", idempotency_key="k1", wait=True
        )
        assert time.monotonic() - t0 < 2.0  # acknowledged by its own commit, not the 10 s batch
        events = r.reward_events()
        assert [(e["id"], e["kind"], e["operator"]) for e in events] == [(eid, "success", "ana")]
        again = w.add_reward_event("r0", "success", 1.0, idempotency_key="k1", wait=True)
        assert again == eid and len(r.reward_events()) == 1
        assert w.counters()["events_duplicate"] == 1
        r.close()


def test_full_queue_raises_and_depth_is_reported(replay_location):
    gate = threading.Event()
    w = ReplayConfig(path=replay_location, max_queue=3, enqueue_timeout_s=0.05).create()
    accepted = []
    actions = np.zeros((4, 2), np.float32)
    with pytest.raises(ReplayFull):
        for i in range(10):  # the first observation stalls the writer (a store that hangs)
            obs = (lambda i=i: (gate.wait(), _obs(i))[1]) if i == 0 else _obs(i)
            accepted.append(w.append_transition("r", "e", i, 0, obs, actions, None, 0, 0, i))
    assert 3 <= w.queue_depth() <= 4  # one item may be in the stalled stage's hands
    gate.set()
    w.close()
    w.close()  # idempotent
    assert [x.id for x in ReplayReader(replay_location).transitions()] == accepted
    with pytest.raises(ReplayClosed):
        _append(w, 99)


def test_corrupted_bytes_raise_corrupt_record(replay_location):
    loc = replay_location
    with ReplayConfig(path=loc).create() as w:
        _append(w, 0)
    r = ReplayReader(loc)
    row = r.transitions()[0]
    if r.postgres:
        import psycopg

        with psycopg.connect(loc, autocommit=True) as conn:
            conn.execute(
                "UPDATE observations SET bytes = set_byte(bytes, 10, get_byte(bytes, 10) # 255)"
            )
    else:
        seg_file = Path(loc) / "segments" / f"{row.seg:08d}.seg"
        data = bytearray(seg_file.read_bytes())
        data[row.off + 10] ^= 0xFF
        seg_file.write_bytes(bytes(data))
    with pytest.raises(CorruptRecord, match="crc32"):
        ReplayReader(loc).observation_bytes(row)


def test_stats_cli_prints_json(replay_location, capsys):
    with ReplayConfig(path=replay_location).create() as w:
        for i in range(3):
            _append(w, i, robot="arm")
    capsys.readouterr()  # the writer's log lines (structlog prints to stdout by default)
    assert stats_main([replay_location]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 3 and stats["per_robot"] == {"arm": 3} and stats["boot_epoch"] == 1
