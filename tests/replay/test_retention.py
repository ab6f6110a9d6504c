"""Retention keeps the store bounded: oldest rows go first, whole segment files with them."""

import contextlib
import sqlite3
import threading

import numpy as np

from openpi_rl.replay import MissingRecord, ReplayConfig, ReplayReader, ReplayWriter, schema

OBS = 10_000


def _fill(tmp_path, n: int, **cfg) -> list[int]:
    # 10 kB records, 5 to a 50 kB segment; commit (and apply retention) every 10 rows.
    config = ReplayConfig(path=tmp_path, segment_max_bytes=5 * (OBS + 12), **cfg)
    ids = []
    with ReplayWriter(config) as w:
        for i in range(n):
            obs = np.random.default_rng(i).bytes(OBS)
            ids.append(w.append_transition("r0", "e0", i, 0, obs, np.zeros(2), None, 0, 0, i))
            if i % 10 == 9:
                w.flush()
    return ids


def _segment_ids(tmp_path) -> list[int]:
    return sorted(int(p.stem) for p in (tmp_path / "segments").glob("*.seg"))


def _all_verify(r: ReplayReader) -> list[int]:
    rows = r.transitions()
    for row in rows:
        assert r.observation_bytes(row) == np.random.default_rng(row.step).bytes(OBS)
    return [row.id for row in rows]


def test_retention_by_rows_drops_oldest_rows_and_their_segments(tmp_path):
    ids = _fill(tmp_path, 100, retention_max_rows=20)
    r = ReplayReader(tmp_path)
    assert _all_verify(r) == ids[-20:]
    segs = _segment_ids(tmp_path)
    assert segs[0] == min(row.seg for row in r.transitions())  # no unreferenced old file left
    assert len(segs) <= 5  # 20 rows at 5 per segment, plus the partly covered first one
    assert r.stats().episodes == 1


def _disk_bytes(root) -> int:
    """What the directory holds on disk: database, WAL, shm and segment files (a segment
    that retention deletes between the listing and its stat holds nothing)."""
    total = 0
    for p in root.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size if p.is_file() else 0
    return total


def test_retention_by_bytes_drops_the_oldest_rows_and_their_segments(tmp_path):
    max_bytes = 600_000  # 100 rows of 10 kB: about 1.1 MB without a cap
    ids = _fill(tmp_path, 100, retention_max_bytes=max_bytes)
    r = ReplayReader(tmp_path)
    kept = _all_verify(r)
    assert kept == ids[-len(kept) :]  # a suffix: the oldest went first
    assert 10 <= len(kept) <= 50
    stats = r.stats()
    assert stats.bytes_total <= max_bytes
    assert _segment_ids(tmp_path)[0] == min(row.seg for row in r.transitions())


def test_the_directory_stays_within_the_cap_while_writing_with_a_concurrent_reader(tmp_path):
    # State-only-like rows (small observations, 2 kB action blobs) so the index is most of the
    # store, as with the soak's robots; a reader queries all the while (the learner's pattern:
    # scans and observation reads) and reward events are acknowledged throughout.
    cap = 2 << 20
    config = ReplayConfig(path=tmp_path, segment_max_bytes=64 << 10, retention_max_bytes=cap)
    stop, read_rows, errors = threading.Event(), [], []

    def read() -> None:
        try:
            with ReplayReader(tmp_path) as r:
                while not stop.is_set():
                    rows = r.transitions()
                    for row in rows[-5:]:
                        with contextlib.suppress(MissingRecord):  # deleted since the query
                            r.observation_bytes(row)
                    read_rows.append(len(rows))
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    peak, acked = 0, []
    with ReplayWriter(config) as w:
        reader = threading.Thread(target=read)
        reader.start()
        for i in range(3000):
            actions = np.random.default_rng(i).standard_normal(256)  # 2 kB
            obs = np.random.default_rng(i).bytes(200)
            w.append_transition("r0", f"e{i // 200}", i, 0, obs, actions, None, 0, 0, i)
            if i % 20 == 19:  # a commit: ~50 kB of rows, ~120 kB of WAL
                acked.append(w.add_reward_event("r0", "success", 1.0, wait=True))
                peak = max(peak, _disk_bytes(tmp_path))  # right after a commit: the worst
        stop.set()
        reader.join()
        counters = w.counters()
    assert not errors and len(read_rows) > 10
    assert counters["retention_rows_deleted"] > 2000  # ~15 MB of index pages were written
    assert peak <= cap
    with ReplayReader(tmp_path) as r:
        assert [e["id"] for e in r.reward_events()] == acked  # nothing acknowledged was lost
        assert r.integrity_check() == "ok"


def test_a_database_from_before_auto_vacuum_is_converted_when_a_byte_cap_is_set(tmp_path):
    conn = sqlite3.connect(schema.db_path(tmp_path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(schema.SCHEMA)
    conn.execute("INSERT INTO schema_version VALUES (?)", (schema.SCHEMA_VERSION,))
    assert not schema.incremental_vacuum(conn)
    conn.close()
    ids = _fill(tmp_path, 20)  # no cap: the file is left as it is
    with sqlite3.connect(schema.db_path(tmp_path)) as conn:
        assert not schema.incremental_vacuum(conn)
    ids += _fill(tmp_path, 100, retention_max_bytes=600_000)
    with sqlite3.connect(schema.db_path(tmp_path)) as conn:
        assert schema.incremental_vacuum(conn)
    with ReplayReader(tmp_path) as r:
        kept = [row.id for row in r.transitions()]
        assert kept == ids[-len(kept) :] and r.stats().bytes_total <= 600_000


def test_reopening_a_store_near_its_cap_keeps_its_rows(tmp_path):
    # The next commit's growth is predicted from the last one; a writer that just opened a full
    # store must not take the whole store for one commit's growth and empty it.
    ids = _fill(tmp_path, 40)  # ~480 kB on disk
    ids += _fill(tmp_path, 5, retention_max_bytes=800_000)  # room for the 5 rows (~60 kB)
    with ReplayReader(tmp_path) as r:
        assert [row.id for row in r.transitions()] == ids
