"""Credit assignment: which stored transition a human's feedback lands on.

A rule is a callable `(conn, feedback) -> Credit`, one per kind. The bridge hands it to the
replay writer, which runs it inside the event's own write transaction
(`ReplayWriter.submit_reward_event(resolve=...)`): it sees every committed transition, and no
other writer can add one between the lookup and the insert. Rules never update
`transitions.reward`; the learner adds `sum(reward_events.value)` per transition, treats one
carrying success/failure as terminal and one carrying end_episode as truncated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple, Protocol

from openpi_rl.replay.store import Connection

KINDS = ("step_reward", "success", "failure", "end_episode")
VERDICTS = ("success", "failure", "end_episode")

ATTACHED = "attached"
UNKNOWN_ROBOT = "unknown_robot"  # no transition of this robot in the replay
UNKNOWN_EPISODE = "unknown_episode"  # the event named an episode the replay does not hold
NO_LIVE_TRANSITION = "no_live_transition"  # nothing of the robot's was live at the time
EPISODE_CLOSED = "episode_closed"  # the episode already has its verdict


@dataclasses.dataclass(frozen=True)
class Feedback:
    """One validated feedback event. `t` is the bridge's wall clock at arrival (the same clock as
    `transitions.t_wall`, written by the server on this machine); `client_time` is the
    pendant's, kept for the record only."""

    robot_id: str
    kind: str
    value: float
    operator: str
    t: float
    idempotency_key: str
    client_time: float | None = None
    episode_id: str | None = None


class Credit(NamedTuple):
    transition_id: int | None
    episode_id: str | None
    status: str
    close_episode: bool = False


class CreditRule(Protocol):
    def __call__(self, conn: Connection, event: Feedback) -> Credit: ...


@dataclasses.dataclass(frozen=True)
class StepRewardRule:
    """A step reward lands on the transition that was live `press_latency_s` before the press
    (the operator reacts late; HIL-SERL-style teleop feedback has the same lag)."""

    press_latency_s: float = 0.3
    max_gap_s: float = 30.0
    """A transition older than this at press time was not live (the robot had stopped)."""

    def __call__(self, conn: Connection, event: Feedback) -> Credit:
        t = event.t - self.press_latency_s
        sql = "SELECT id, episode_id, t_wall FROM transitions WHERE robot_id = ? AND t_wall <= ?"
        args: tuple = (event.robot_id, t)
        if event.episode_id is not None:
            sql, args = sql + " AND episode_id = ?", (*args, event.episode_id)
        row = conn.execute(sql + " ORDER BY t_wall DESC LIMIT 1", args).fetchone()
        if row is None or t - row[2] > self.max_gap_s:
            return Credit(None, event.episode_id, _why_absent(conn, event))
        return Credit(row[0], row[1], ATTACHED)


@dataclasses.dataclass(frozen=True)
class VerdictRule:
    """success / failure / end_episode: the value lands on the last transition of the episode
    that was running at the press, and the episode is closed. One verdict per episode: a later
    one is stored unattached (`episode_closed`), so a double press cannot count twice."""

    def __call__(self, conn: Connection, event: Feedback) -> Credit:
        episode = event.episode_id
        if episode is None:
            row = conn.execute(
                "SELECT episode_id FROM transitions WHERE robot_id = ? AND t_wall <= ?"
                " ORDER BY t_wall DESC LIMIT 1",
                (event.robot_id, event.t),
            ).fetchone()
            if row is None:
                return Credit(None, None, _why_absent(conn, event))
            episode = row[0]
        last = conn.execute(
            "SELECT last_transition FROM episodes WHERE robot_id = ? AND episode_id = ?",
            (event.robot_id, episode),
        ).fetchone()
        if last is None:
            return Credit(None, episode, _why_absent(conn, event))
        closed = conn.execute(
            "SELECT 1 FROM reward_events WHERE robot_id = ? AND episode_id = ?"
            " AND transition_id IS NOT NULL AND kind IN (?, ?, ?) LIMIT 1",
            (event.robot_id, episode, *VERDICTS),
        ).fetchone()
        if closed is not None:
            return Credit(None, episode, EPISODE_CLOSED)
        return Credit(last[0], episode, ATTACHED, close_episode=True)


def _why_absent(conn: Connection, event: Feedback) -> str:
    known = conn.execute(
        "SELECT 1 FROM transitions WHERE robot_id = ? LIMIT 1", (event.robot_id,)
    ).fetchone()
    if known is None:
        return UNKNOWN_ROBOT
    if event.episode_id is not None:
        ep = conn.execute(
            "SELECT 1 FROM episodes WHERE robot_id = ? AND episode_id = ?",
            (event.robot_id, event.episode_id),
        ).fetchone()
        if ep is None:
            return UNKNOWN_EPISODE
    return NO_LIVE_TRANSITION


def default_rules(press_latency_s: float = 0.3) -> dict[str, CreditRule]:
    """The rule per kind; pass a modified copy to `RewardBridge(rules=...)` to change one."""
    verdict = VerdictRule()
    return {
        "step_reward": StepRewardRule(press_latency_s),
        "success": verdict,
        "failure": verdict,
        "end_episode": verdict,
    }


def resolver(rules: Mapping[str, CreditRule], event: Feedback):  # -> writer's Resolve
    """Bind a rule to an event, in the shape `ReplayWriter.submit_reward_event` runs."""
    rule = rules[event.kind]
    return lambda conn: tuple(rule(conn, event))
