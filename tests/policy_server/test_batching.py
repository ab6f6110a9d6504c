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


def _steady(forecast: ArrivalForecast, robot: str, start: float, interval: float, n: int) -> None:
    for i in range(n):
        forecast.arrived(robot, start + i * interval)


def test_a_lone_robot_is_never_held():
    f = ArrivalForecast()
    _steady(f, "a", 0.0, 0.040, 5)
    assert f.hold_until(0.160, 0.160, 0.003, {"a"}) == 0.160


def test_a_batch_waits_for_a_robot_due_inside_the_window_and_no_longer():
    f = ArrivalForecast()
    _steady(f, "a", 0.0, 0.040, 4)  # last at 0.120, due 0.160
    _steady(f, "b", 0.001, 0.040, 4)  # last at 0.121, due 0.161
    f.arrived("a", 0.160)
    until = f.hold_until(0.160, 0.160, 0.003, {"a"})
    assert until == pytest.approx(0.163)  # b due at 0.161 + slack, capped at the window's end
    assert f.hold_until(0.160, 0.160, 0.0005, {"a"}) == 0.160  # b is due after a short window
    f.arrived("b", 0.1612)
    assert f.hold_until(0.160, 0.1612, 0.003, {"a", "b"}) == 0.160  # everyone is here: serve


def test_robots_not_due_or_long_overdue_or_gone_are_not_waited_for():
    f = ArrivalForecast(forget_s=1.0)
    _steady(f, "slow", 0.0, 0.100, 3)  # due 0.300: past the window
    _steady(f, "late", 0.090, 0.040, 3)  # due 0.250: overdue by more than its slack at 0.2701
    assert f.hold_until(0.270, 0.2701, 0.003, {"x"}) == 0.270
    _steady(f, "gone", 0.0, 0.010, 3)  # due 0.030, last seen > forget_s ago
    assert f.hold_until(2.0, 2.0, 0.003, {"x"}) == 2.0


def test_the_table_is_bounded():
    f = ArrivalForecast(max_robots=8)
    for i in range(100):
        f.arrived(f"r{i}", i * 1e-3)
        f.arrived(f"r{i}", i * 1e-3 + 1e-4)
    assert len(f._last) <= 8 and len(f._interval) <= 8


@pytest.mark.parametrize("expected_wait_us", [10_000, 0], ids=["hold", "no-hold"])
def test_a_lockstep_fleet_stays_in_full_batches(tmp_path, expected_wait_us):
    """4 closed-loop robots on a model that takes 25 ms (a delay added here, as a large model on
    a busy machine): without the hold, the first robot back is served alone and the fleet
    splits into smaller batches; with it, nearly every call serves all four."""
    config = GaussianMLPConfig(obs_dim=6, action_dim=2, action_horizon=4)
    ac = ActorCritic(config.create(jax.random.key(0)), value_in_dim=6, value_hidden=(16,))
    options = ServeOptions(
        endpoint="tcp://127.0.0.1:*", max_batch=4, expected_wait_us=expected_wait_us
    )
    srv = PolicyServer(ac, options)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    assert srv._ready.wait(60)
    sample = srv.snapshot.sample

    def slow_sample(*args, **kwargs):
        time.sleep(0.025)
        return sample(*args, **kwargs)

    srv.snapshot.sample = slow_sample
    rng = np.random.default_rng(0)
    obs = {"state": rng.standard_normal(6).astype(np.float32)}
    barrier = threading.Barrier(4)
    errors: list[Exception] = []

    def robot(i: int) -> None:
        try:
            with PolicyClient(srv.endpoint, robot_id=f"r{i}", timeout_s=10) as client:
                barrier.wait()
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
    calls = next(
        s.value
        for m in srv.metrics.registry.collect()
        for s in m.samples
        if s.name.endswith("batch_size_count")
    )
    mean_batch = 120 / calls
    if expected_wait_us:
        assert mean_batch >= 3.5, mean_batch
    else:
        assert mean_batch < 3.5, mean_batch  # what the hold is for: the fleet splits without it
