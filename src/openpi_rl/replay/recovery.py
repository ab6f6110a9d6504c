"""Startup recovery: make the index and the segment files agree before the writer appends.

A `kill -9` mid-append can leave a torn record at the end of the newest segment (the writer
flushes a segment before committing the rows that point into it, so no committed row points at
those bytes). Power loss without fsync can leave committed rows pointing past the bytes that
reached the disk. Both are cut here: the torn tail is truncated, such rows are deleted.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from pathlib import Path

import structlog

from openpi_rl.replay.segments import list_segments, scan_valid_end, segment_path

log = structlog.get_logger("openpi_rl.replay")


@dataclasses.dataclass(frozen=True)
class RecoveryReport:
    torn_segment: int | None  # the segment whose tail was cut, if any
    torn_bytes: int  # bytes cut from its end
    rows_deleted: int  # rows that pointed past a segment's valid end or into a missing segment


def recover(conn: sqlite3.Connection, seg_dir: Path) -> RecoveryReport:
    segs = list_segments(seg_dir)
    valid_end: dict[int, int] = {s: segment_path(seg_dir, s).stat().st_size for s in segs}
    torn_segment, torn_bytes = None, 0
    if segs:
        newest = segs[-1]
        path = segment_path(seg_dir, newest)
        end = scan_valid_end(path)
        if end < valid_end[newest]:
            torn_segment, torn_bytes = newest, valid_end[newest] - end
            os.truncate(path, end)
            log.warning("replay.torn_tail_cut", segment=newest, valid_end=end, cut_bytes=torn_bytes)
            valid_end[newest] = end

    deleted = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        referenced = [r[0] for r in conn.execute("SELECT DISTINCT seg FROM transitions")]
        for seg in referenced:
            if seg not in valid_end:
                cur = conn.execute("DELETE FROM transitions WHERE seg = ?", (seg,))
                log.warning("replay.segment_missing", segment=seg, rows_deleted=cur.rowcount)
            else:
                cur = conn.execute(
                    "DELETE FROM transitions WHERE seg = ? AND off + len > ?",
                    (seg, valid_end[seg]),
                )
            deleted += cur.rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if deleted:
        log.warning("replay.rows_past_segment_end_deleted", rows=deleted)
    return RecoveryReport(torn_segment=torn_segment, torn_bytes=torn_bytes, rows_deleted=deleted)
