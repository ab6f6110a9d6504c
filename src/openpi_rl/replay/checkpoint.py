"""`WalCheckpointer`: keeps the replay's WAL small, on its own thread (`replay-checkpoint`).

SQLite's own checkpoints are PASSIVE: they copy what no reader still needs and never wait, and
the WAL file is only reused from its start when, at the writer's next commit, everything was
copied and no reader still reads from it. With commits every 50 ms on one thread and checkpoints
on another, that moment rarely comes, and the file never shrinks anyway: under a 16-robot soak
the WAL reached 47 MiB within 15 s and stayed there. So, once the WAL reaches `wal_bytes`:

1. PASSIVE copies the bulk concurrently with commits (no lock taken);
2. TRUNCATE copies the rest, waits for readers on older snapshots (at most `busy_timeout_s`,
   during which new commits wait: they are off the serving path) and truncates the file to 0.

A TRUNCATE that times out (a long reader) is retried after a growing pause, so that a reader
stuck in a long query cannot make commits wait most of the time. If commits outrun the thread
and the WAL reaches 1.5 `wal_bytes`, the commit stage checkpoints itself (`check`): the
writer's queue absorbs the pause, and the WAL stays within the reserve of twice `wal_bytes` that
the cap keeps for it (`retention.DiskBudget`), a commit's pages included.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import structlog

from openpi_rl.replay import schema

log = structlog.get_logger("openpi_rl.replay")


class WalCheckpointer:
    def __init__(self, root: Path, wal_bytes: int, busy_timeout_s: float = 0.25):
        self.root = root
        self.wal_bytes = wal_bytes
        self.busy_timeout_s = busy_timeout_s
        db = schema.db_path(root)
        self._wal_path = db.with_name(db.name + "-wal")
        self._due = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # one checkpoint at a time: the thread's or an inline one
        self.counters = {"checkpoints": 0, "checkpoints_inline": 0, "checkpoints_busy": 0}
        self._thread = threading.Thread(target=self._run, name="replay-checkpoint", daemon=True)
        self._thread.start()

    def check(self, conn: sqlite3.Connection) -> None:
        """Called by the commit stage after each commit: wake the thread once the WAL has reached
        `wal_bytes` (a stat, a few microseconds); at 1.5 times that, checkpoint on `conn` now."""
        try:
            size = self._wal_path.stat().st_size
        except FileNotFoundError:
            return
        if size >= self.wal_bytes:
            self._due.set()
        hard = self.wal_bytes * 3 // 2
        if size < hard:
            return
        # The thread may be checkpointing right now (SQLite lets one run at a time): wait for
        # it, then look again.
        with self._lock:
            if self._wal_path.stat().st_size < hard:
                return
            self.counters["checkpoints_inline"] += 1
            timeout = conn.execute("PRAGMA busy_timeout").fetchone()[0]
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            try:
                if checkpoint(conn, self.root):
                    self.counters["checkpoints_busy"] += 1
            finally:
                conn.execute(f"PRAGMA busy_timeout={timeout}")

    def close(self, timeout: float | None = None) -> None:
        """Stop after the checkpoint in progress (the last connection to close copies the rest)."""
        self._stopping.set()
        self._due.set()
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        conn = sqlite3.connect(schema.db_path(self.root), isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            pause = 0.05
            while True:
                self._due.wait()
                self._due.clear()
                if self._stopping.is_set():
                    return
                with self._lock:
                    busy = checkpoint(conn, self.root)
                self.counters["checkpoints"] += 1
                if not busy:
                    pause = 0.05
                    continue
                self.counters["checkpoints_busy"] += 1
                self._stopping.wait(pause)
                pause = min(2 * pause, 2.0)
        finally:
            conn.close()


def checkpoint(conn: sqlite3.Connection, root: Path) -> bool:
    """PASSIVE (the bulk, without locks), then TRUNCATE (the rest, waiting up to the connection's
    busy timeout for readers of older snapshots). Returns True if the WAL could not be truncated."""
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return bool(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])
    except sqlite3.Error:  # the next one copies these pages too
        log.exception("replay.checkpoint_failed", path=str(root))
        return True
