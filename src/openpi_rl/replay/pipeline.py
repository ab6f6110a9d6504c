"""What flows through the `ReplayWriter`'s stages, and the SQL that lands one commit's worth.

Callers put items on the writer's queue; the segment stage turns each append into a row that
points at its bytes and passes every item on, in order; the commit stage gathers them into a
`Batch` and writes it in one transaction (`write_batch`). An item is a tuple whose first field
is its kind (below); a waiter is a future set once the item's commit is done. No threads and no
writer state here: the segment stage lives in `writer.py`, the commit stage in `committer.py`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import sqlite3
from collections.abc import Callable
from typing import Any, NamedTuple

import structlog

from openpi_rl.replay import records

log = structlog.get_logger("openpi_rl.replay")

# Item kinds. APPEND: a caller's transition (observation bytes not yet written); ROW: the same
# after the segment stage, (ROW, segment, row); REPORT and EVENT (their waiter last), BARRIER
# (BARRIER, waiter); STOP: the end of the stream.
APPEND, REPORT, EVENT, BARRIER, STOP, ROW = range(6)
CHUNK = 64  # items a stage takes from its queue at once


class RewardEventResult(NamedTuple):
    """A committed reward event as stored (`duplicate`: its idempotency key was stored before,
    and these are the first event's fields)."""

    id: int
    transition_id: int | None
    episode_id: str | None
    status: str | None
    duplicate: bool


Credit = tuple[int | None, str | None, str | None, bool]
"""(transition_id, episode_id, status, close_episode), from a `resolve` callable."""
Resolve = Callable[[sqlite3.Connection], Credit]


def new_waiter() -> concurrent.futures.Future:
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_running_or_notify_cancel()  # a caller's cancel() can no longer break the writer
    return fut


def take(q: queue.Queue, timeout: float | None) -> list[tuple]:
    """The next item and what else is waiting, up to CHUNK (so deadlines are checked often);
    [] if nothing came within `timeout`."""
    try:
        items = [q.get(timeout=timeout)]
    except queue.Empty:
        return []
    while len(items) < CHUNK and items[-1][0] != STOP:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    return items


def fail_waiters(items: list[tuple], error: BaseException) -> None:
    for item in items:
        fut = item[1] if item[0] == BARRIER else item[-1] if item[0] in (EVENT, REPORT) else None
        if fut is not None and not fut.done():
            fut.set_exception(error)


def wait_for(fut: concurrent.futures.Future, timeout: float | None) -> Any:
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"replay commit not done after {timeout} s") from None


@dataclasses.dataclass
class Batch:
    """The items of one commit: transition rows, per-episode (first id, last id, count),
    reports, events, and the waiters to set once it is committed."""

    rows: list[tuple] = dataclasses.field(default_factory=list)
    episodes: dict[tuple[str, str], list[int]] = dataclasses.field(default_factory=dict)
    reports: list[tuple] = dataclasses.field(default_factory=list)
    events: list[tuple] = dataclasses.field(default_factory=list)
    waiters: list[concurrent.futures.Future] = dataclasses.field(default_factory=list)
    # (transition id, observation record) for a store that keeps them in the database
    # (PostgreSQL); SQLite rows point into segment files instead.
    observations: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)
    obs_bytes: int = 0
    refused_rows: int = 0  # rows `write_isolated` refused, and their observation bytes
    refused_bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.rows or self.reports or self.events or self.waiters)

    def add(self, item: tuple) -> None:
        """Gather one item (not STOP) from the segment stage, or from the callers' queue."""
        kind = item[0]
        if kind == ROW:
            row = item[2]
            tid, robot, ep, length = row[0], row[1], row[2], row[9]
            self.rows.append(row)
            self.obs_bytes += length
            agg = self.episodes.get((robot, ep))
            if agg is None:
                self.episodes[(robot, ep)] = [tid, tid, 1]
            else:
                agg[0], agg[1], agg[2] = min(agg[0], tid), max(agg[1], tid), agg[2] + 1
        elif kind == REPORT:
            self.reports.append(item[1:])  # its waiter last: set with whether it was found
            self.waiters.append(item[-1])
        elif kind == EVENT:
            self.events.append(item[1:])
            self.waiters.append(item[-1])
        elif kind == BARRIER:
            self.waiters.append(item[1])


def encode_append(item: tuple) -> tuple[tuple, bytes, tuple]:
    """An APPEND item as a row's columns before the observation's place (id .. t_wall), the
    observation record's bytes, and the columns after it (actions .. value). A callable
    observation is called here, on the writer's thread (`ReplayAdder` passes one)."""
    (_, tid, robot, ep, step, ver, t_mono, t_wall, obs, act, pact, logp, value) = item
    if callable(obs):
        obs = obs()
    tail = (records.encode_array(act), records.encode_array(pact), logp, value)
    return (tid, robot, ep, step, ver, t_mono, t_wall), obs, tail


class ItemRefused(Exception):
    """The store refused one item (the rest of its batch committed): a value SQLite cannot
    hold, a constraint. Counted as `items_refused`; the item's waiter gets this error."""


# Errors that belong to one item, not to the store: a value SQLite cannot hold (an int past
# 64 bits, a type it cannot bind) or a constraint. Anything else (I/O, disk full, corruption)
# is the store's.
ITEM_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.DataError,
    OverflowError,
    ValueError,
    TypeError,
)


def write_batch(
    conn: sqlite3.Connection, batch: Batch, counters: dict[str, int]
) -> tuple[list[RewardEventResult], list[bool]]:
    """Insert a batch's rows and events and apply its reports, inside the caller's write
    transaction; returns each event's result and whether each report found its transition
    (the robot's own: a report from another robot matches nothing), in order. Any error
    propagates: the caller rolls back and retries item by item (`write_isolated`)."""
    conn.executemany(_INSERT_ROW, batch.rows)
    if batch.observations:
        conn.executemany(_INSERT_OBSERVATION, batch.observations)
    conn.executemany(_UPSERT_EPISODE, [(r, e, *agg) for (r, e), agg in batch.episodes.items()])
    found = [apply_report(conn, *r[:-1]) for r in batch.reports]
    _count_missing(found, counters)
    return [insert_event(conn, *ev) for ev in batch.events], found


def write_isolated(
    conn: sqlite3.Connection,
    batch: Batch,
    counters: dict[str, int],
    item_errors: tuple[type[BaseException], ...] = ITEM_ERRORS,
) -> tuple[list[RewardEventResult | ItemRefused], list[bool | ItemRefused]]:
    """`write_batch` one item at a time, each in its own savepoint: an item the store refuses
    is rolled back alone, counted in `counters["items_refused"]` and returned as `ItemRefused`
    in its place (a row is dropped), so one bad item never takes its batch or the writer down."""

    def isolated(what: str, fn: Callable[[], Any]) -> Any:
        conn.execute("SAVEPOINT item")
        try:
            out = fn()
        except item_errors as e:
            conn.execute("ROLLBACK TO item")
            conn.execute("RELEASE item")
            counters["items_refused"] += 1
            log.error("replay.item_refused", item=what, error=f"{e!r:.300}")
            return ItemRefused(f"replay refused the {what}: {e!r:.200}")
        conn.execute("RELEASE item")
        return out

    observations = dict(batch.observations)

    def row(r: tuple) -> None:
        conn.execute(_INSERT_ROW, r)
        if r[0] in observations:
            conn.execute(_INSERT_OBSERVATION, (r[0], observations[r[0]]))
        conn.execute(_UPSERT_EPISODE, (r[1], r[2], r[0], r[0], 1))

    batch.refused_rows = batch.refused_bytes = 0
    for r in batch.rows:
        if isinstance(isolated("transition", lambda r=r: row(r)), ItemRefused):
            batch.refused_bytes += r[9]
            batch.refused_rows += 1
    found = [isolated("report", lambda r=r: apply_report(conn, *r[:-1])) for r in batch.reports]
    _count_missing([f for f in found if not isinstance(f, ItemRefused)], counters)
    events = [
        isolated("reward event", lambda ev=ev: insert_event(conn, *ev)) for ev in batch.events
    ]
    return events, found


_INSERT_ROW = (
    "INSERT INTO transitions (id, robot_id, episode_id, step, policy_version, t_mono,"
    " t_wall, seg, off, len, crc, actions, policy_actions, logp, value)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_OBSERVATION = "INSERT INTO observations (id, bytes) VALUES (?, ?)"
_UPSERT_EPISODE = (
    "INSERT INTO episodes (robot_id, episode_id, first_transition, last_transition,"
    " steps) VALUES (?, ?, ?, ?, ?) ON CONFLICT (robot_id, episode_id) DO UPDATE SET"
    " first_transition = least(episodes.first_transition, excluded.first_transition),"
    " last_transition = greatest(episodes.last_transition, excluded.last_transition),"
    " steps = episodes.steps + excluded.steps"
)


def apply_report(
    conn: sqlite3.Connection,
    reward: float,
    done: int,
    truncated: int,
    intervened: int,
    executed: bytes | None,
    tid: int,
    robot_id: str | None,
) -> bool:
    """Sum a report into its transition (and its episode's return); False if no transition
    has that id (and, when `robot_id` is given, that robot)."""
    cur = conn.execute(
        "UPDATE transitions SET reward = reward + ?, done = greatest(done, ?),"
        " truncated = greatest(truncated, ?), intervened = greatest(intervened, ?),"
        " executed_actions = coalesce(?, executed_actions)"
        " WHERE id = ? AND (CAST(? AS TEXT) IS NULL OR robot_id = ?)",
        (reward, done, truncated, intervened, executed, tid, robot_id, robot_id),
    )
    if cur.rowcount == 0:
        return False
    conn.execute(
        "UPDATE episodes SET ep_return = ep_return + ?, ended = greatest(ended, ?, ?)"
        " WHERE (robot_id, episode_id) ="
        " (SELECT robot_id, episode_id FROM transitions WHERE id = ?)",
        (reward, done, truncated, tid),
    )
    return True


def _count_missing(found: list[bool], counters: dict[str, int]) -> None:
    missing = found.count(False)
    if missing:
        counters["reports_missing"] += missing
        log.warning("replay.report_for_unknown_transition", count=missing)


def insert_event(
    conn, eid, robot, kind, value, operator, t, t_wall, key, trans, episode, status,
    client_time, resolve, fut,
) -> RewardEventResult:  # fmt: skip
    """Store one EVENT item's fields (`resolve` runs here, inside the write transaction); a
    stored idempotency key returns the stored event instead."""
    if key is not None:
        row = conn.execute(
            "SELECT id, transition_id, episode_id, status FROM reward_events"
            " WHERE idempotency_key = ?",
            (key,),
        ).fetchone()
        if row is not None:
            return RewardEventResult(*row, duplicate=True)
    close = False
    if resolve is not None:
        try:
            trans, episode, status, close = resolve(conn)
        except Exception as e:  # a broken rule must not lose the event or stop the writer
            log.exception("replay.event_resolve_failed", robot_id=robot, kind=kind)
            trans, close, status = None, False, f"credit_error: {e!r:.200}"
    conn.execute(
        "INSERT INTO reward_events (id, robot_id, kind, value, operator, t, t_wall,"
        " idempotency_key, transition_id, episode_id, status, client_time)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            eid,
            robot,
            kind,
            value,
            operator,
            t,
            t_wall,
            key,
            trans,
            episode,
            status,
            client_time,
        ),
    )
    if close and episode is not None:
        conn.execute(
            "UPDATE episodes SET ended = 1 WHERE robot_id = ? AND episode_id = ?",
            (robot, episode),
        )
    return RewardEventResult(eid, trans, episode, status, duplicate=False)
