"""Credit assignment against a real replay, on both backends: rules run inside the event's
commit, through an events-only writer opened next to the owner's writer (as the bridge runs
beside a server)."""

import contextlib

import pytest

from openpi_rl.replay import ReplayConfig, ReplayEventsConfig, store
from openpi_rl.reward_bridge import Credit, Feedback, StepRewardRule, default_rules
from openpi_rl.reward_bridge.credit import resolver
from tests.reward_bridge.conftest import add_transitions


@pytest.fixture
def replay(replay_location):
    with ReplayConfig(path=replay_location, commit_interval_s=0.01).create() as w:
        yield w


@pytest.fixture
def events(replay):
    with ReplayEventsConfig(path=replay.root).create() as w:
        yield w


def _t_wall(replay, tid: int) -> float:
    with contextlib.closing(store.connect(replay.root)) as conn:
        return conn.execute("SELECT t_wall FROM transitions WHERE id = ?", (tid,)).fetchone()[0]


def _ended(replay, robot: str, episode: str) -> int:
    with contextlib.closing(store.connect(replay.root)) as conn:
        sql = "SELECT ended FROM episodes WHERE robot_id = ? AND episode_id = ?"
        return conn.execute(sql, (robot, episode)).fetchone()[0]


def _submit(events, rules, kind, t, value=1.0, robot="arm-1", episode=None, key=None):
    ev = Feedback(robot, kind, value, "ana", t, key or f"k-{kind}-{t}", episode_id=episode)
    fut = events.submit_reward_event(
        robot, kind, value, "ana", t, ev.idempotency_key, resolve=resolver(rules, ev)
    )
    return fut.result(10)


def test_step_reward_lands_on_the_transition_live_press_latency_before(replay, events):
    ids = add_transitions(replay, "arm-1", "ep-1", 3, gap_s=0.1)
    rules = default_rules(press_latency_s=0.3)
    t_b, t_c = _t_wall(replay, ids[1]), _t_wall(replay, ids[2])
    # Pressed just after C started: the operator was reacting to B.
    assert _submit(events, rules, "step_reward", t_c + 0.3 - 0.01).transition_id == ids[1]
    assert _submit(events, rules, "step_reward", t_c + 0.3 + 0.01).transition_id == ids[2]
    early = _submit(events, rules, "step_reward", t_b - 1.0)  # before the robot's first chunk
    assert (early.transition_id, early.status) == (None, "no_live_transition")


def test_verdicts_close_the_episode_once_on_its_last_transition(replay, events):
    ids = add_transitions(replay, "arm-1", "ep-1", 4)
    rules = default_rules()
    t = _t_wall(replay, ids[-1]) + 0.5
    first = _submit(events, rules, "success", t)
    assert (first.transition_id, first.episode_id, first.status) == (ids[-1], "ep-1", "attached")
    assert _ended(replay, "arm-1", "ep-1") == 1
    again = _submit(events, rules, "failure", t + 0.1)  # a second verdict cannot count twice
    assert (again.transition_id, again.status) == (None, "episode_closed")
    ids2 = add_transitions(replay, "arm-1", "ep-2", 2)
    end = _submit(events, rules, "end_episode", _t_wall(replay, ids2[-1]) + 0.1, value=0.0)
    assert (end.transition_id, end.episode_id) == (ids2[-1], "ep-2")
    assert _ended(replay, "arm-1", "ep-2") == 1


def test_unknown_robot_and_episode_are_stored_and_named(replay, events):
    add_transitions(replay, "arm-1", "ep-1", 1)
    rules = default_rules()
    ghost = _submit(events, rules, "success", 1e10, robot="ghost")
    assert (ghost.transition_id, ghost.status) == (None, "unknown_robot")
    lost = _submit(events, rules, "failure", 1e10, episode="ep-404")
    assert (lost.transition_id, lost.episode_id, lost.status) == (None, "ep-404", "unknown_episode")
    events.flush()
    with contextlib.closing(store.connect(replay.root)) as conn:
        assert conn.execute("SELECT count(*) FROM reward_events").fetchone()[0] == 2


def test_rules_are_pluggable_and_a_failing_rule_still_stores_the_event(replay, events):
    ids = add_transitions(replay, "arm-1", "ep-1", 3)

    def first_of_episode(conn, ev: Feedback) -> Credit:
        row = conn.execute(
            "SELECT first_transition, episode_id FROM episodes WHERE robot_id = ?", (ev.robot_id,)
        ).fetchone()
        return Credit(row[0], row[1], "attached")

    def broken(conn, ev):
        raise RuntimeError("rule bug")

    rules = {**default_rules(), "step_reward": first_of_episode, "success": broken}
    assert _submit(events, rules, "step_reward", 1e10).transition_id == ids[0]
    failed = _submit(events, rules, "success", 1e10)
    assert failed.transition_id is None and failed.status.startswith("credit_error")
    assert isinstance(StepRewardRule(), StepRewardRule)  # the default stays importable
