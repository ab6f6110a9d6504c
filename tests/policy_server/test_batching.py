"""Predictive batching: hold a batch only for robots about to arrive (batching.py), and the
server keeping a lockstep fleet in full batches."""

import threading
import time

import jax
import numpy as np
import pytest

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.policy_server.batching import ArrivalForecast
from openpi_rl.policy_server.server import PolicyServer, ServeOptions
from openpi_rl.rl import ActorCritic
from openpi_rl_client import PolicyClient


def _loop(f: ArrivalForecast, robot: str, start: float, think: float, call: float, n: int) -> float:
    """`n` round trips of a robot that sends `think` s after each reply; returns its last reply."""
    t = start
    for _ in range(n):
        f.arrived(robot, t)
        t += call
        f.replied(robot, t)
        t += think
    return t - think


def test_a_lone_robot_is_never_held():
    f = ArrivalForecast()
    last = _loop(f, "a", 0.0, 0.001, 0.020, 5)
    f.arrived("a", last + 0.001)
    assert f.hold_until(last + 0.001, last + 0.001, 0.003, {"a"}) == last + 0.001


def test_a_batch_waits_for_an_answered_robot_due_inside_the_window_and_no_longer():
    f = ArrivalForecast()
    _loop(f, "a", 0.0, 0.001, 0.020, 4)  # closed loops: 1 ms think time, replied at 0.084
    _loop(f, "b", 0.0, 0.0015, 0.020, 4)  # replied at 0.0845: due at 0.086
    t = 0.085
    f.arrived("a", t)
    assert f.hold_until(t, t, 0.003, {"a"}) == pytest.approx(t + 0.003)
    assert f.hold_until(t, t, 0.0005, {"a"}) == t  # b is due after a short window: serve now
    assert f.hold_until(t, 0.0885, 0.003, {"a"}) == pytest.approx(t + 0.003)  # b 2.5 ms late
    assert f.hold_until(t, 0.0895, 0.003, {"a"}) == t  # later than the window: not coming
    f.arrived("b", 0.0862)
    assert f.hold_until(t, 0.0862, 0.003, {"a", "b"}) == t  # everyone is here: serve


def test_robots_still_waiting_not_due_long_overdue_or_gone_are_not_held_for():
    f = ArrivalForecast(forget_s=1.0)
    last_slow = _loop(f, "slow", 0.0, 0.050, 0.010, 3)  # periodic: due 50 ms after its reply
    f.arrived("busy", 0.0)  # answered never: its request is still in the server
    _loop(f, "late", 0.0, 0.004, 0.010, 3)  # due 0.046, overdue by more than its slack later
    t = last_slow + 0.001
    f.arrived("x", t)
    assert f.hold_until(t, t, 0.003, {"x"}) == t
    assert f.hold_until(5.0, 5.0, 0.003, {"x"}) == 5.0  # everyone silent for > forget_s


def test_a_fleet_back_from_a_pause_together_waits_one_window_for_its_cohort():
    f = ArrivalForecast()
    batch = frozenset({"a", "b"})
    t = 0.0
    for _ in range(4):  # a and b served together, 1 ms think time
        f.arrived("a", t)
        f.arrived("b", t + 0.0002)
        t += 0.020
        f.replied("a", t, batch)
        f.replied("b", t, batch)
        t += 0.001
    _loop(f, "c", 0.0, 0.001, 0.020, 4)  # as overdue, but always served alone: no cohort
    t += 0.5  # everyone paused (an episode reset); a is back first, b and c are overdue
    f.arrived("a", t)
    assert f.hold_until(t, t, 0.003, {"a"}) == pytest.approx(t + 0.003)  # waits for b only
    f.arrived("b", t + 0.0005)
    assert f.hold_until(t, t + 0.0005, 0.003, {"a", "b"}) == t  # b is here; c is not a's
    f.arrived("c", t)
    assert f.hold_until(t, t, 0.003, {"c"}) == t  # a lone robot is still never held


def test_a_pause_barely_moves_the_think_time():
    f = ArrivalForecast()
    last = _loop(f, "a", 0.0, 0.001, 0.020, 5)
    f.arrived("a", last + 2.0)  # an episode reset: two seconds off
    assert f.think_time("a") < 0.002


def test_the_table_is_bounded():
    f = ArrivalForecast(max_robots=8)
    for i in range(100):
        _loop(f, f"r{i}", i * 1e-3, 1e-4, 1e-4, 2)
    assert len(f) <= 8
    assert sum(f.think_time(f"r{i}") is not None for i in range(100)) <= 8


def test_a_lockstep_fleet_stays_in_full_batches(tmp_path):
    """4 closed-loop robots on a model that takes 25 ms (a delay added here, as a large model on
    a busy machine): with the hold nearly every call serves all four. (Without it, the first
    robot back is often served alone and the fleet splits: mean batch 2.8-3.6 in our runs, too
    timing-dependent to assert.)"""
    expected_wait_us = 10_000
    config = GaussianMLPConfig(obs_dim=6, action_dim=2, action_horizon=4)
    ac = ActorCritic(config.create(jax.random.key(0)), value_in_dim=6, value_hidden=(16,))
    options = ServeOptions(
        endpoint="tcp://127.0.0.1:*", max_batch=4, expected_wait_us=expected_wait_us
    )
    srv = PolicyServer(ac, options)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    assert srv.wait_ready(60)
    sample = srv.snapshot.sample

    def slow_sample(*args, **kwargs):
        time.sleep(0.025)
        return sample(*args, **kwargs)

    srv.snapshot.sample = slow_sample
    rng = np.random.default_rng(0)
    obs = {"state": rng.standard_normal(6).astype(np.float32)}

    def calls() -> float:
        return next(
            s.value
            for m in srv.metrics.registry.collect()
            for s in m.samples
            if s.name.endswith("batch_size_count")
        )

    # Warm-up round trips first: the forecast needs each robot's think time (and the server
    # its model's call time) before it can hold for anyone; then all start together again.
    counted: list[float] = []
    start, errors = threading.Barrier(4), []
    measure = threading.Barrier(4, action=lambda: counted.append(calls()))

    def robot(i: int) -> None:
        try:
            with PolicyClient(srv.endpoint, robot_id=f"r{i}", timeout_s=10) as client:
                start.wait()
                for _ in range(8):
                    client.infer(obs)
                measure.wait()
                for _ in range(30):
                    client.infer(obs)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    robots = [threading.Thread(target=robot, args=(i,)) for i in range(4)]
    for t in robots:
        t.start()
    for t in robots:
        t.join(60)
    srv.close(wait_s=30)
    thread.join(30)
    assert not errors
    mean_batch = 120 / (calls() - counted[0])
    print(f"mean batch {mean_batch:.2f}")
    assert mean_batch >= 3.5, mean_batch
