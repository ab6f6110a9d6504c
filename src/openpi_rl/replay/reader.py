"""`ReplayReader`: read-only access to a replay directory, from any process, while the writer
runs. Each query sees the rows committed when it starts.

Every query runs to its end before its rows are turned into objects (`fetchall`), so a reader
holds a WAL snapshot for the query's time only: a snapshot held longer keeps the writer from
truncating the WAL. Segment files are kept open in a small LRU, and one that retention deleted
is closed, so a long-lived reader (the learner) does not keep deleted files' bytes on disk.

The location is a directory or a `postgresql://` URL (`postgres.py`): the queries are the same,
only where observation records are read from (segment files, or the `observations` table) and
how bytes on disk are counted differ.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from openpi_rl.replay import postgres, records, schema
from openpi_rl.replay.committer import SEQ_BITS
from openpi_rl.replay.records import StoredObservation
from openpi_rl.replay.segments import (
    CorruptRecord,
    MissingRecord,
    crc32,
    list_segments,
    read_payload,
    segment_path,
)

MAX_OPEN_SEGMENTS = 8
_COLUMNS = (
    "id, robot_id, episode_id, step, policy_version, t_mono, t_wall, seg, off, len, crc,"
    " actions, policy_actions, logp, value, reward, done, truncated, intervened,"
    " executed_actions, consumed"
)


@dataclasses.dataclass(frozen=True)
class TransitionRow:
    """One served action chunk as stored. Its observation: `ReplayReader.observation`."""

    id: int
    robot_id: str
    episode_id: str
    step: int
    policy_version: int
    t_mono: float
    t_wall: float
    seg: int
    off: int
    len: int
    crc: int
    actions: np.ndarray
    policy_actions: np.ndarray | None
    logp: float
    value: float
    reward: float
    done: bool
    truncated: bool
    intervened: bool
    executed_actions: np.ndarray | None
    consumed: bool

    @classmethod
    def from_sql(cls, r: tuple) -> TransitionRow:
        return cls(
            *r[:11],
            records.decode_array(r[11]),  # type: ignore[arg-type]
            records.decode_array(r[12]),
            r[13],
            r[14],
            r[15],
            bool(r[16]),
            bool(r[17]),
            bool(r[18]),
            records.decode_array(r[19]),
            bool(r[20]),
        )


@dataclasses.dataclass(frozen=True)
class ReplayStats:
    rows: int
    episodes: int
    reward_events: int
    bytes_db: int  # database + WAL + shared-memory index
    bytes_segments: int
    bytes_total: int
    segments: int
    oldest_t_wall: float | None
    newest_t_wall: float | None
    boot_epoch: int
    per_robot: dict[str, int]


class ReplayReader:
    def __init__(self, path: str | Path):
        """`path`: the replay directory, or its PostgreSQL URL."""
        self.postgres = postgres.is_url(path)
        self.root: str | Path = str(path) if self.postgres else Path(path)
        self._seg_dir = Path("/nonexistent") if self.postgres else Path(path) / schema.SEGMENTS_DIR
        self._conn: Any = (
            postgres.connect_reader(str(path))
            if self.postgres
            else schema.connect_reader(Path(path))
        )
        # Rows up to this id were written before the record format (format 2: requests).
        self._legacy_max_id = schema.legacy_max_id(self._conn)
        self._fds: collections.OrderedDict[Path, int] = collections.OrderedDict()  # file -> fd
        self._writer_dirs: dict[int, Path] = {}  # PostgreSQL: boot epoch -> segment directory

    def count(self) -> int:
        return self._conn.execute("SELECT count(*) FROM transitions").fetchone()[0]

    def transitions(
        self,
        robot_id: str | None = None,
        episode_id: str | None = None,
        policy_version: int | None = None,
        since_id: int | None = None,
        limit: int | None = None,
    ) -> list[TransitionRow]:
        """Committed transitions matching all the given filters, in id (serving) order."""
        where, args = [], []
        for col, val in (
            ("robot_id", robot_id),
            ("episode_id", episode_id),
            ("policy_version", policy_version),
        ):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val if col == "policy_version" else str(val))
        if since_id is not None:
            where.append("id > ?")
            args.append(since_id)
        sql = f"SELECT {_COLUMNS} FROM transitions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [TransitionRow.from_sql(r) for r in self._conn.execute(sql, args).fetchall()]

    def newest_policy_version(self) -> int | None:
        """The highest policy version of a stored chunk (None: none stored)."""
        return self._conn.execute("SELECT max(policy_version) FROM transitions").fetchone()[0]

    def recent_by_robot(
        self, per_robot: int, max_robots: int, scan: int = 65_536
    ) -> dict[str, tuple[str, int, list[int]]]:
        """Among the newest `scan` transitions: robot -> (its latest episode, the step after
        its latest one, its newest ids up to `per_robot`, oldest first), for the `max_robots`
        robots heard from last (a restarted server's memory of its robots)."""
        rows = self._conn.execute(
            "SELECT id, robot_id, episode_id, step FROM transitions ORDER BY id DESC LIMIT ?",
            (scan,),
        ).fetchall()
        out: dict[str, tuple[str, int, list[int]]] = {}
        for tid, robot, episode, step in rows:  # newest first
            seen = out.get(robot)
            if seen is None:
                if len(out) >= max_robots:
                    continue
                out[robot] = seen = (episode, step + 1, [])
            if len(seen[2]) < per_robot:
                seen[2].append(tid)
        return {r: (e, n, ids[::-1]) for r, (e, n, ids) in reversed(out.items())}

    def episodes(self, robot_id: str | None = None) -> list[dict[str, Any]]:
        sql = (
            "SELECT robot_id, episode_id, first_transition, last_transition, steps, ep_return,"
            " ended FROM episodes"
        )
        args: tuple = ()
        if robot_id is not None:
            sql, args = sql + " WHERE robot_id = ?", (str(robot_id),)
        cols = ("robot_id", "episode_id", "first_transition", "last_transition", "steps")
        cols += ("ep_return", "ended")
        return [dict(zip(cols, r, strict=True)) for r in self._conn.execute(sql, args).fetchall()]

    def reward_events(
        self, robot_id: str | None = None, since_id: int | None = None
    ) -> list[dict[str, Any]]:
        cols = ("id", "robot_id", "kind", "value", "operator", "t", "t_wall")
        cols += ("idempotency_key", "transition_id")
        sql = f"SELECT {', '.join(cols)} FROM reward_events WHERE id > ?"
        args: list = [since_id or 0]
        if robot_id is not None:
            sql += " AND robot_id = ?"
            args.append(str(robot_id))
        rows = self._conn.execute(sql + " ORDER BY id", args).fetchall()
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def observation(self, row: TransitionRow) -> dict[str, np.ndarray]:
        """The model's arrays the chunk was served for (read-only), as the server validated
        them. `CorruptRecord` / `MissingRecord` as `observation_bytes`; ValueError if the bytes
        are not an observation record."""
        return self.stored_observation(row).arrays

    def stored_observation(self, row: TransitionRow) -> StoredObservation:
        """The row's observation arrays and the robot's prompt (None when it sent none)."""
        return records.decode_observation(
            self.observation_bytes(row),
            where=f"transition {row.id}",
            legacy=row.id <= self._legacy_max_id,
        )

    def observation_bytes(self, row: TransitionRow) -> bytes:
        """The row's observation record (`records.py`) as stored, verified against its crc32
        (`CorruptRecord` if not); `MissingRecord` if retention deleted its segment (or row)."""
        if self.postgres and row.seg == 0:  # in the observations table
            found = self._conn.execute(
                "SELECT bytes FROM observations WHERE id = ?", (row.id,)
            ).fetchone()
            if found is None:
                raise MissingRecord(f"transition {row.id}: no observation stored")
            payload = bytes(found[0])
            if len(payload) != row.len or crc32(payload) != row.crc:
                raise CorruptRecord(
                    f"transition {row.id}: observation of {len(payload)} bytes does not match "
                    f"its row ({row.len} bytes, crc32 {row.crc})"
                )
            return payload
        path = self._segment_file(row)
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError as e:
                raise MissingRecord(f"transition {row.id}: segment {path} is gone") from e
            self._close_deleted_segments()
            self._fds[path] = fd
            while len(self._fds) > MAX_OPEN_SEGMENTS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(path)
        return read_payload(fd, row.off, row.len, row.crc, where=f"transition {row.id}")

    def _segment_file(self, row: TransitionRow) -> Path:
        """Where a row's record is: its segment in the directory, or (PostgreSQL with
        `observations_dir`) in the segment directory of the writer that stored it, named by
        the boot epoch in the row's id."""
        if not self.postgres:
            return segment_path(self._seg_dir, row.seg)
        epoch = row.id >> SEQ_BITS
        if epoch not in self._writer_dirs:
            self._writer_dirs = postgres.writer_dirs(self._conn)
        seg_dir = self._writer_dirs.get(epoch)
        if seg_dir is None:
            raise MissingRecord(f"transition {row.id}: its writer's segment directory is gone")
        return segment_path(seg_dir, row.seg)

    def _close_deleted_segments(self) -> None:
        """An open file that retention unlinked still takes its bytes on disk: close it."""
        for seg, fd in list(self._fds.items()):
            if os.fstat(fd).st_nlink == 0:
                os.close(self._fds.pop(seg))

    def stats(self) -> ReplayStats:
        q = self._conn.execute
        rows = q("SELECT count(*) FROM transitions").fetchone()[0]
        oldest = q("SELECT t_wall FROM transitions ORDER BY id LIMIT 1").fetchone()
        newest = q("SELECT t_wall FROM transitions ORDER BY id DESC LIMIT 1").fetchone()
        epoch = q("SELECT value FROM meta WHERE key = 'boot_epoch'").fetchone()
        per_robot = dict(
            q("SELECT robot_id, count(*) FROM transitions GROUP BY robot_id").fetchall()
        )
        if self.postgres:  # the database's tables, and the writers' segments if any
            bytes_db = postgres.relation_bytes(self._conn)
            files = [
                segment_path(d, n)
                for d in postgres.writer_dirs(self._conn).values()
                for n in list_segments(d)
            ]
            segs, bytes_segments = files, 0
            for f in files:
                with contextlib.suppress(FileNotFoundError):  # retention may delete it meanwhile
                    bytes_segments += f.stat().st_size
        else:
            db = schema.db_path(Path(self.root))
            bytes_db = sum(
                p.stat().st_size
                for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"))
                if p.exists()
            )
            segs = list_segments(self._seg_dir)
            bytes_segments = 0
            for s in segs:
                with contextlib.suppress(FileNotFoundError):  # retention may delete it meanwhile
                    bytes_segments += segment_path(self._seg_dir, s).stat().st_size
        return ReplayStats(
            rows=rows,
            episodes=q("SELECT count(*) FROM episodes").fetchone()[0],
            reward_events=q("SELECT count(*) FROM reward_events").fetchone()[0],
            bytes_db=bytes_db,
            bytes_segments=bytes_segments,
            bytes_total=bytes_db + bytes_segments,
            segments=len(segs),
            oldest_t_wall=oldest[0] if oldest else None,
            newest_t_wall=newest[0] if newest else None,
            boot_epoch=int(epoch[0]) if epoch else 0,
            per_robot=per_robot,
        )

    def integrity_check(self) -> str:
        """ "ok", or what is wrong: SQLite's own check of its file; in PostgreSQL (whose pages
        the server checks) that every transition has its observation."""
        if not self.postgres:
            return self._conn.execute("PRAGMA integrity_check").fetchone()[0]
        missing = self._conn.execute(
            "SELECT count(*) FROM transitions t WHERE t.seg = 0 AND NOT EXISTS"
            " (SELECT 1 FROM observations o WHERE o.id = t.id)"
        ).fetchone()[0]
        return "ok" if missing == 0 else f"{missing} transitions without an observation"

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._conn.close()

    def __enter__(self) -> ReplayReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
