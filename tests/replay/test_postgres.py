"""What only the PostgreSQL backend does: many writers on one database, riding out the database's
crash, retention by wall time and stored bytes. (The rest of the replay's suite runs on both
backends through the `replay_location` fixture.) Real PostgreSQL servers, from `pg_cluster`."""

import json
import subprocess
import sys
import textwrap
import time

import numpy as np

from openpi_rl.replay import ReplayConfig, ReplayEventsConfig, ReplayFull, ReplayReader
from openpi_rl.replay.committer import SEQ_BITS
from openpi_rl.replay.pipeline import CHUNK


def _append(w, i: int, robot: str = "r0", size: int = 1000) -> int:
    obs = np.random.default_rng(i).bytes(size)
    actions = np.full((4, 2), i, np.float32)
    return w.append_transition(robot, "e0", i, 1, obs, actions, None, -1.0, 0.0, float(i))


WRITER = """
import json, sys, numpy as np
from openpi_rl.replay import ReplayConfig
url, robot, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
a = np.zeros((4, 2), np.float32)
with ReplayConfig(path=url, commit_interval_s=0.01).create() as w:
    ids = [w.append_transition(robot, "e", i, 0, bytes([i % 256]) * 500, a, None, 0, 0, i)
           for i in range(n)]
    epoch = w.boot_epoch
print(json.dumps({"ids": ids, "epoch": epoch}))
"""


def test_many_writers_on_one_database_never_collide(pg_url):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WRITER), pg_url, f"arm-{k}", "300"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(3)
    ]
    with ReplayEventsConfig(path=pg_url).create() as bridge:  # a reward bridge beside them
        events = [bridge.add_reward_event(f"arm-{k}", "success", 1.0, wait=True) for k in range(3)]
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    ids = [i for out in outs for i in out["ids"]] + events
    assert len(set(ids)) == len(ids) == 903
    assert len({out["epoch"] for out in outs} | {e >> SEQ_BITS for e in events}) == 4
    with ReplayReader(pg_url) as r:
        assert r.count() == 900
        assert r.stats().per_robot == {f"arm-{k}": 300 for k in range(3)}
        assert sorted(e["id"] for e in r.reward_events()) == sorted(events)
        for k, out in enumerate(outs):
            rows = r.transitions(robot_id=f"arm-{k}")
            assert [x.id for x in rows] == out["ids"]
            assert r.observation_bytes(rows[7]) == bytes([7]) * 500
        assert r.integrity_check() == "ok"


def test_a_writer_rides_out_a_killed_database_and_loses_nothing_it_acknowledged(own_cluster):
    url = own_cluster.create_database()
    w = ReplayConfig(path=url, max_queue=256, enqueue_timeout_s=0.005).create()
    accepted, refused, reports = [], 0, []
    try:
        for i in range(40):
            accepted.append(_append(w, i))
        w.flush()
        reports.append((accepted[0], w.report(accepted[0], 1.0, False, False)))
        own_cluster.kill()  # kill -9 of the postmaster: its backends go with it
        for i in range(40, 600):  # the queue holds 256, then callers are told it is full
            try:
                accepted.append(_append(w, i))
            except ReplayFull:
                refused += 1
            if i % 50 == 0:
                try:  # the robot is told `overloaded` past the queue, and sends it again later
                    reports.append((accepted[-1], w.report(accepted[-1], 2.0, False, False)))
                except ReplayFull:
                    refused += 1
        assert refused > 0 and w.error is None  # bounded memory, and the writer lives
        down_depth = w.queue_depth()
        own_cluster.restart()
        deadline = time.monotonic() + 60
        while w.queue_depth() > 0 and time.monotonic() < deadline:  # reconnected: it drains
            time.sleep(0.05)
        event = w.add_reward_event("r0", "success", 1.0, wait=True, timeout=60)
        for i in range(600, 640):
            accepted.append(_append(w, i))
        w.flush(timeout=60)
        counters = w.counters()
    finally:
        w.close()
    # The queue, and what the stage ran ahead of the commit stage with (PgReplayWriter.STAGED_CHUNKS)
    assert 200 <= down_depth <= 256 + 2 + 2 * CHUNK
    assert counters["db_reconnects"] >= 1 and counters["db_errors"] >= 1
    found = {tid: fut.result(10) for tid, fut in reports}
    with ReplayReader(url) as r:
        rows = {row.id: row for row in r.transitions()}
        assert sorted(rows) == sorted(accepted)  # each acknowledged row exactly once
        for tid, reward in ((tid, 1.0 if tid == accepted[0] else 2.0) for tid in found):
            assert found[tid] is True and rows[tid].reward == reward  # each report once
        assert [e["id"] for e in r.reward_events()] == [event]
        assert r.integrity_check() == "ok"


def test_retention_deletes_the_oldest_rows_by_wall_time_past_the_caps(pg_url):
    cfg = ReplayConfig(path=pg_url, retention_max_rows=100, commit_interval_s=0.01)
    with cfg.create() as w:
        for i in range(150):
            _append(w, i)
        w.flush()  # the commit after these runs retention: 150 rows, past the cap of 100
        time.sleep(1.1)  # it runs at most once a second
        last = _append(w, 150)
        w.flush()  # 91 rows: within the cap
        deleted = w.counters()["retention_rows_deleted"]
    with ReplayReader(pg_url) as r:
        rows = r.transitions()
        assert deleted == 60 and len(rows) == 91  # down to 90 % of the cap, then one more
        assert rows[-1].id == last and [x.step for x in rows] == list(range(60, 151))
        assert r.integrity_check() == "ok"  # their observations went with them (CASCADE)
        assert r.stats().episodes == 1  # the episode keeps its remaining rows

    with ReplayConfig(path=pg_url, retention_max_bytes=50_000).create() as w:
        w.flush()  # 91 kB of observation records, past 50 kB
    with ReplayReader(pg_url) as r:
        rows = r.transitions()
        assert len(rows) == 45 and sum(x.len for x in rows) == 45_000  # 90 % of the cap
        assert [x.step for x in rows] == list(range(106, 151))  # the newest kept


def test_observation_records_in_segment_files_beside_the_database(pg_url, tmp_path):
    obs_dir = tmp_path / "shared" / "observations"
    cfg = ReplayConfig(
        path=pg_url, observations_dir=obs_dir, segment_max_bytes=10_000, commit_interval_s=0.01
    )
    with cfg.create() as first:
        a = [_append(first, i, robot="arm-a") for i in range(30)]
    second = cfg.create()  # a second server's writer, on its own files
    b = [_append(second, i, robot="arm-b", size=3000) for i in range(10)]
    second.flush()
    with ReplayReader(pg_url) as r:
        rows = {row.id: row for row in r.transitions()}
        assert sorted(rows) == sorted(a + b)
        for i, tid in enumerate(a):
            assert r.observation_bytes(rows[tid]) == np.random.default_rng(i).bytes(1000)
        assert r.observation_bytes(rows[b[3]]) == np.random.default_rng(3).bytes(3000)
        assert all(rows[t].seg > 0 for t in a + b)  # not in the observations table
        stats = r.stats()
        assert stats.bytes_segments >= 30 * 1000 + 10 * 3000 and r.integrity_check() == "ok"
    first_dir = obs_dir / f"writer-{a[0] >> SEQ_BITS}"
    assert len(list(first_dir.glob("*.seg"))) == 4  # 10 kB files: 9 records each

    # Retention: the first writer (closed) loses all its rows, so its files and directory go;
    # the live second writer keeps the file it writes.
    second.close()
    cfg = ReplayConfig(
        path=pg_url, observations_dir=obs_dir, retention_max_rows=5, segment_max_bytes=10_000
    )
    with cfg.create() as third:
        c = [_append(third, i, robot="arm-c") for i in range(3)]
    counters = third.counters()  # closed: the retention after its commit is done
    assert counters["retention_rows_deleted"] == 40 + 3 - 4
    assert not first_dir.exists()
    with ReplayReader(pg_url) as r:
        kept = r.transitions()
        assert [x.id for x in kept] == b[-1:] + c
        for x in kept:
            r.observation_bytes(x)  # every kept row's file is still there
        # The second writer's files before its last row's are gone.
        assert [p.name for p in (obs_dir / f"writer-{b[0] >> SEQ_BITS}").glob("*.seg")] == [
            f"{kept[0].seg:08d}.seg"
        ]
