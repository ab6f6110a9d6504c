"""`ReplayEventsWriter`: reward events into a replay another process owns (the reward bridge's).

The policy server's `ReplayWriter` owns the transitions, the segment files and the directory's
owner lock; this writer opens the same database beside it and inserts reward events only. So it
takes no lock, runs no segment recovery (it would truncate the tail of the segment a live server
is appending to), creates no segment files and applies no retention. Its ids come from their own
boot epoch, so they never collide with the server's. It keeps SQLite's autocheckpoint: its
commits are small, and the store's owner truncates the WAL. Commits, retries on a busy
database and fsync are the `Committer`'s (`committer.py`), the same as the owner's.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from openpi_rl.replay import postgres, retention, schema
from openpi_rl.replay.committer import COUNTERS, Committer

if TYPE_CHECKING:
    from openpi_rl.replay.pg_writer import PgEventsWriter

log = structlog.get_logger("openpi_rl.replay")


@dataclasses.dataclass(frozen=True)
class ReplayEventsConfig:
    path: Path | str
    """Directory of the store (created if missing; its segment files are not touched), or a
    `postgresql://` URL."""
    commit_interval_s: float = 0.05
    """Events are committed in batches at most this long after they were handed to the writer
    (at once when a caller waits on one)."""
    fsync_interval_s: float | None = None
    """None: never fsync (a `kill -9` loses nothing committed: the page cache outlives the
    process). A number: the commit that syncs the WAL comes that often, against power loss."""
    max_queue: int = 4096
    enqueue_timeout_s: float = 0.1
    """How long an event waits on a full queue before raising `ReplayFull`."""
    busy_timeout_s: float = 5.0
    """How long one commit waits for another process's write lock; past it the commit is
    rolled back and retried (counted as `commit_retries`), never dropped."""

    def create(self) -> ReplayEventsWriter | PgEventsWriter:
        """The writer for this location: SQLite for a directory, PostgreSQL for a URL."""
        if postgres.is_url(self.path):
            from openpi_rl.replay.pg_writer import PgEventsWriter

            return PgEventsWriter(self)
        return ReplayEventsWriter(self)


class ReplayEventsWriter(Committer):
    """Reward events into a replay directory beside its owner. Thread-safe to call (`add_reward_
    event`, `submit_reward_event`, `flush`); `close()` flushes."""

    def __init__(self, config: ReplayEventsConfig):
        root = Path(config.path)
        root.mkdir(parents=True, exist_ok=True)
        conn = schema.connect_writer(
            root,
            busy_timeout_s=config.busy_timeout_s,
            journal_size_limit=retention.DiskBudget.make(None).wal_bytes,
        )
        super().__init__(config, root, conn, COUNTERS)
        self._threads = [threading.Thread(target=self._run, name="replay-writer", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("replay.open", path=str(root), boot_epoch=self.boot_epoch, events_only=True)
