"""Mean episode return per policy version, read from the store: what the pendant's chart shows.

An episode's return is what the learner learns from: the environment rewards reported for its
transitions (`episodes.ep_return`) plus the operators' feedback events credited to them
(`reward_events.transition_id`). Only ended episodes count, and an episode counts for a version
only if that version served its first and its last chunk: an episode that straddles a hot-swap
is left out, as the policy server's `EpisodeReturns` (which automatic rollback compares versions
by) leaves it out. Reading only those two chunks keeps the query's cost to a few row lookups per
episode (one in which a rollback went back to its first version mid-way still counts).
"""

from __future__ import annotations

from typing import NamedTuple

from openpi_rl.replay.store import Connection

_PER_VERSION = """
WITH recent AS (
    SELECT ep.robot_id, ep.episode_id, ep.first_transition, ep.last_transition, ep.ep_return
    FROM episodes ep JOIN transitions lt ON lt.id = ep.last_transition
    WHERE ep.ended = 1 ORDER BY lt.t_wall DESC, lt.id DESC LIMIT ?
), events AS (
    SELECT t.robot_id, t.episode_id, sum(e.value) AS value
    FROM reward_events e JOIN transitions t ON t.id = e.transition_id
    WHERE e.transition_id >= (SELECT min(first_transition) FROM recent)
    GROUP BY t.robot_id, t.episode_id
), per_episode AS (
    SELECT f.policy_version AS lo, l.policy_version AS hi,
           r.ep_return + coalesce(ev.value, 0) AS ret
    FROM recent r
    JOIN transitions f ON f.id = r.first_transition
    JOIN transitions l ON l.id = r.last_transition
    LEFT JOIN events ev ON ev.robot_id = r.robot_id AND ev.episode_id = r.episode_id
)
SELECT lo, count(*), avg(ret) FROM per_episode WHERE lo = hi GROUP BY lo ORDER BY lo
"""


class VersionReturn(NamedTuple):
    """One policy version's ended episodes (among the recent ones) and their mean return."""

    version: int
    episodes: int
    mean_return: float


def mean_return_per_version(conn: Connection, last_episodes: int = 10_000) -> list[VersionReturn]:
    """Mean return per policy version over the `last_episodes` ended episodes (newest by their
    last transition's serving time: ids order by server when several share a PostgreSQL
    replay), versions ascending; a version with no such episode is absent.

    `conn`: a connection to the store's database (`replay.store.connect`). The cost grows
    with the number of episodes and the events on them, not with their transitions."""
    if last_episodes < 1:
        raise ValueError(f"last_episodes: expected a positive count, got {last_episodes}")
    rows = conn.execute(_PER_VERSION, (last_episodes,)).fetchall()
    return [VersionReturn(int(v), int(n), float(m)) for v, n, m in rows]
