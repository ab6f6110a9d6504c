"""Retention keeps the store bounded: oldest rows go first, whole segment files with them."""

import numpy as np

from openpi_rl.replay import ReplayConfig, ReplayReader, ReplayWriter

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


def test_retention_by_bytes_drops_whole_oldest_segments(tmp_path):
    max_bytes = 200_000
    ids = _fill(tmp_path, 100, retention_max_bytes=max_bytes)
    r = ReplayReader(tmp_path)
    kept = _all_verify(r)
    assert kept == ids[-len(kept) :]  # a suffix: the oldest went first
    assert 5 <= len(kept) <= 25  # the cap also holds the index's pages (~80 kB of schema)
    stats = r.stats()
    # at most the limit, plus the segment being written when retention last ran
    assert stats.bytes_segments <= max_bytes + 5 * (OBS + 12)
    assert _segment_ids(tmp_path)[0] == min(row.seg for row in r.transitions())


def test_the_byte_cap_counts_the_index_when_observations_are_small(tmp_path):
    # State-only robots: 100-byte observations, 8 kB action blobs: the SQLite rows, not the
    # segments, are the store. The cap must hold them too.
    max_bytes = 1_000_000
    config = ReplayConfig(path=tmp_path, segment_max_bytes=5_000, retention_max_bytes=max_bytes)
    with ReplayWriter(config) as w:
        for i in range(1500):
            actions = np.random.default_rng(i).standard_normal(1000)  # 8 kB
            w.append_transition("r0", "e0", i, 0, bytes(100), actions, None, 0, 0, i)
            if i % 50 == 49:
                w.flush()
        index = w._index_bytes()
    r = ReplayReader(tmp_path)
    stats = r.stats()
    assert 0 < r.count() < 1500  # the oldest went
    assert index + stats.bytes_segments <= max_bytes + 60 * 8_300  # + one commit's rows
