"""Retention of a PostgreSQL replay: the oldest rows past the caps, and the segment files no row
points into any more.

Run by a writer after a commit (`pg_writer.py`), at most once a second, by one writer at a time
(an advisory lock; the others skip the round). Rows go oldest first by wall time (ids order by
writer, not by time); their observations go with them (ON DELETE CASCADE); PostgreSQL's
autovacuum makes the space reusable. A writer's segment files (`observations_dir`) go once no
row points into them; a writer that is gone (its advisory lock is free) loses its directory
once none of its rows is left.
"""

from __future__ import annotations

import contextlib

import structlog

from openpi_rl.replay import postgres
from openpi_rl.replay.committer import SEQ_BITS
from openpi_rl.replay.segments import list_segments, segment_path

log = structlog.get_logger("openpi_rl.replay")

LOW_WATER = 0.9


def apply_retention(
    conn: postgres.Connection,
    max_rows: int | None,
    max_bytes: int | None,
    current: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Delete the oldest transitions (by wall time; their observations go with them) past
    `max_rows` rows or `max_bytes` stored observation bytes, down to `LOW_WATER` of the cap, the
    episodes left without a transition, and the segment files no row points into any more
    (`current`: this writer's (epoch, segment being written), never deleted). One writer at a
    time (advisory lock; the others skip this round). Returns (rows, files) deleted."""
    conn.execute("BEGIN")
    try:
        got = conn.execute("SELECT pg_try_advisory_xact_lock(?)", (postgres.LOCK_RETENTION,))
        if not got.fetchone()[0]:
            conn.execute("COMMIT")
            return 0, 0
        rows, stored = conn.execute(
            "SELECT count(*), coalesce(sum(len), 0)::bigint FROM transitions"
        ).fetchone()
        cut = 0
        if max_rows is not None and rows > max_rows:
            cut = rows - int(max_rows * LOW_WATER)
        if max_bytes is not None and stored > max_bytes:
            keep = int(max_bytes * LOW_WATER)
            # Rows newest first with the bytes up to each: those past `keep` go.
            past = conn.execute(
                "SELECT count(*) FROM (SELECT sum(len) OVER (ORDER BY t_wall DESC, id DESC) AS c"
                " FROM transitions) s WHERE c > ?",
                (keep,),
            ).fetchone()[0]
            cut = max(cut, past)
        deleted = 0
        if cut > 0:
            deleted = conn.execute(
                "DELETE FROM transitions WHERE id IN"
                " (SELECT id FROM transitions ORDER BY t_wall, id LIMIT ?)",
                (cut,),
            ).rowcount
            conn.execute(
                "DELETE FROM episodes e WHERE NOT EXISTS (SELECT 1 FROM transitions t"
                " WHERE t.robot_id = e.robot_id AND t.episode_id = e.episode_id)"
            )
        conn.execute("COMMIT")
    except BaseException:
        if not conn.closed and conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    files = _delete_segments(conn, current) if deleted else 0
    if deleted:
        log.info(
            "replay.retention", rows_deleted=deleted, rows_before=rows, bytes_before=stored,
            segment_files_deleted=files,
        )  # fmt: skip
    return deleted, files


def _delete_segments(conn: postgres.Connection, current: tuple[int, int] | None) -> int:
    """Delete each writer's segment files below the lowest segment its remaining rows point
    into (a writer only ever appends to its newest file, which is at or past that one). A
    writer with no row left: this one's files below the one it writes; another's, all of them
    once it is gone (its lock is free), with its directory."""
    deleted = 0
    for epoch, seg_dir in postgres.writer_dirs(conn).items():
        lo, hi = epoch << SEQ_BITS, (epoch + 1) << SEQ_BITS
        low = conn.execute(
            "SELECT min(seg) FROM transitions WHERE id >= ? AND id < ? AND seg > 0", (lo, hi)
        ).fetchone()[0]
        gone = False
        if low is None and current is not None and current[0] == epoch:
            low = current[1]
        elif low is None:
            took = conn.execute("SELECT pg_try_advisory_lock(?, ?)", (postgres.LOCK_WRITERS, epoch))
            if not took.fetchone()[0]:
                continue  # alive, and its rows are not committed yet
            conn.execute("SELECT pg_advisory_unlock(?, ?)", (postgres.LOCK_WRITERS, epoch))
            gone, low = True, None
        for n in list_segments(seg_dir):
            if low is None or n < low:
                with contextlib.suppress(FileNotFoundError):
                    segment_path(seg_dir, n).unlink()
                    deleted += 1
        if gone:
            with contextlib.suppress(OSError):
                seg_dir.rmdir()
            conn.execute("DELETE FROM meta WHERE key = ?", (f"{postgres.OBS_DIR_KEY}{epoch}",))
    return deleted
