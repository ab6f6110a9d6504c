"""The bridge's events-only writer leaves a live server's store alone, never collides on ids,
and waits out a busy database instead of losing an event."""

import sqlite3
import threading
import time

import numpy as np

from openpi_rl.replay import (
    ReplayConfig,
    ReplayEventsConfig,
    ReplayEventsWriter,
    ReplayWriter,
    schema,
)


def test_events_only_writer_does_not_touch_segments(tmp_path):
    owner = ReplayWriter(ReplayConfig(path=tmp_path))
    owner.append_transition("r0", "e0", 0, 1, b"x" * 100, np.zeros(2), None, 0.0, 0.0, 0.0)
    owner.flush()
    seg = next((tmp_path / "segments").iterdir())
    with open(seg, "ab") as f:  # a torn tail, as a running server's file may show mid-append
        f.write(b"partial")
    size = seg.stat().st_size
    with ReplayEventsWriter(ReplayEventsConfig(path=tmp_path)) as events:
        eid = events.add_reward_event("r0", "success", 1.0, wait=True)
        assert seg.stat().st_size == size  # no recovery ran on the owner's segment
        assert events.boot_epoch != owner.boot_epoch  # ids of the two writers never collide
        assert eid >> 40 == events.boot_epoch
    owner.close()


def test_events_only_writer_creates_no_segment_dir(tmp_path):
    with ReplayEventsWriter(ReplayEventsConfig(path=tmp_path / "new")) as events:
        events.add_reward_event("r0", "failure", -1.0, wait=True)
    assert not (tmp_path / "new" / "segments").exists()


def test_a_busy_database_is_retried_not_lost(tmp_path):
    events = ReplayEventsWriter(ReplayEventsConfig(path=tmp_path, busy_timeout_s=0.05))
    other = sqlite3.connect(
        tmp_path / schema.DB_NAME, isolation_level=None, check_same_thread=False
    )
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock for 0.6 s
    threading.Timer(0.6, lambda: other.execute("COMMIT")).start()
    t0 = time.monotonic()
    eid = events.add_reward_event("r0", "step_reward", 1.0, idempotency_key="k", wait=True)
    assert time.monotonic() - t0 >= 0.5
    assert events.counters()["commit_retries"] >= 1
    events.close()
    with sqlite3.connect(tmp_path / schema.DB_NAME) as conn:
        assert conn.execute("SELECT id FROM reward_events").fetchall() == [(eid,)]


def test_a_version_1_store_is_migrated(tmp_path):
    ReplayEventsWriter(ReplayEventsConfig(path=tmp_path)).close()
    with sqlite3.connect(tmp_path / schema.DB_NAME) as conn:
        for index in ("reward_events_episode", "reward_events_transition"):
            conn.execute(f"DROP INDEX {index}")
        for col in ("episode_id", "status", "client_time"):
            conn.execute(f"ALTER TABLE reward_events DROP COLUMN {col}")
        conn.execute("UPDATE schema_version SET version = 1")
    with ReplayEventsWriter(ReplayEventsConfig(path=tmp_path)) as w:
        w.submit_reward_event("r0", "success", 1.0, episode_id="e1", status="x").result(10)
    with sqlite3.connect(tmp_path / schema.DB_NAME) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (
            schema.SCHEMA_VERSION,
        )
        assert conn.execute("SELECT episode_id, status FROM reward_events").fetchone() == (
            "e1",
            "x",
        )
