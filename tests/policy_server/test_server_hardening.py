"""One bad message never stops the robots (issue 12), through the real server and client: a
report must name a transition this server served to the reporting robot, its numbers are
range-checked and clamped, it is acknowledged only once committed, and a stage that dies fails
health and ends the server (so its supervisor restarts it) instead of refusing every robot."""

import contextlib
import threading
import time

import jax
import numpy as np
import pytest
import zmq

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.policy_server.server import PolicyServer, ServeOptions
from openpi_rl.replay import ReplayConfig, ReplayReader
from openpi_rl.rl import ActorCritic
from openpi_rl_client import PROTOCOL_VERSION, PolicyClient, ServerError, wire

CONFIG = GaussianMLPConfig(obs_dim=6, action_dim=2, action_horizon=4)


def _start(tmp_path, commit_interval_s=0.02, **options):
    ac = ActorCritic(CONFIG.create(jax.random.key(0)), value_in_dim=6, value_hidden=(16,))
    srv = PolicyServer(
        ac,
        ServeOptions(endpoint="tcp://127.0.0.1:*", max_batch=4, **options),
        ReplayConfig(path=str(tmp_path / "replay"), commit_interval_s=commit_interval_s),
    )
    thread = threading.Thread(target=srv.run, name="server", daemon=True)
    thread.start()
    assert srv.wait_ready(60)
    return srv, thread


@pytest.fixture
def server(tmp_path):
    srv, thread = _start(tmp_path)
    yield srv
    srv.close()
    thread.join(30)
    assert not thread.is_alive()


def _obs(rng):
    return {"state": rng.standard_normal(6).astype(np.float32)}


def _raw(endpoint: str, msg: dict) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"", wire.packb({"protocol_version": PROTOCOL_VERSION, **msg})])
        assert sock.poll(10_000), "no reply"
        return wire.unpackb(sock.recv_multipart()[-1])
    finally:
        sock.close()


def _report(tid, robot="arm-1", **fields):
    return {"type": "report", "robot_id": robot, "transition_id": tid, "reward": 1.0,
            "done": False, "truncated": False, **fields}  # fmt: skip


@pytest.mark.parametrize("tid", [2**63, 2**64 - 1, -(2**63), 0, 1])
def test_a_report_naming_an_id_never_served_is_unknown_and_serving_goes_on(server, tmp_path, tid):
    rng = np.random.default_rng(0)
    reply = _raw(server.endpoint, _report(tid))
    assert reply["error"]["code"] == "unknown_transition"
    with PolicyClient(server.endpoint, robot_id="arm-1", timeout_s=5.0) as client:
        for _ in range(3):
            out = client.infer(_obs(rng), episode_id="e1")
            assert client.report(out.transition_id, reward=1.0)["ok"] is True
        assert client.health()["status"] == "ready"
    server.close(wait_s=30)
    with ReplayReader(tmp_path / "replay") as r:
        assert [row.reward for row in r.transitions()] == [1.0, 1.0, 1.0]


def test_a_report_on_another_robots_transition_is_refused_and_changes_nothing(server, tmp_path):
    rng = np.random.default_rng(1)
    with PolicyClient(server.endpoint, robot_id="victim", timeout_s=5.0) as victim:
        out = victim.infer(_obs(rng), episode_id="e1")
    with PolicyClient(server.endpoint, robot_id="attacker", timeout_s=5.0) as attacker:
        attacker.infer(_obs(rng), episode_id="e9")
        with pytest.raises(ServerError) as e:
            attacker.report(out.transition_id, reward=-1000.0, done=True, intervened=True)
        assert e.value.code == "unknown_transition" and "'attacker'" in e.value.message
    # The victim reconnects (a new socket, the same robot id): its transition is still its own.
    with PolicyClient(server.endpoint, robot_id="victim", timeout_s=5.0) as victim:
        assert victim.report(out.transition_id, reward=0.5)["ok"] is True
    server.close(wait_s=30)
    with ReplayReader(tmp_path / "replay") as r:
        (row,) = r.transitions(robot_id="victim")
        assert (row.reward, row.done, row.intervened) == (0.5, False, False)


def test_executed_actions_must_have_the_chunks_shape(server):
    rng = np.random.default_rng(2)
    with PolicyClient(server.endpoint, robot_id="arm-1", timeout_s=5.0) as client:
        out = client.infer(_obs(rng))
        for bad in (np.zeros((3, 2), np.float32), np.zeros(2, np.float32), np.zeros((4, 9))):
            with pytest.raises(ServerError) as e:
                client.report(out.transition_id, executed_actions=bad, intervened=True)
            assert e.value.code == "invalid_field" and "chunk's shape [4, 2]" in e.value.message
        huge = np.full((4, 2), 2**62, np.int64)  # finite as int, not as float32? it is: 4.6e18
        assert client.report(out.transition_id, executed_actions=huge)["ok"] is True
        ok = np.ones((4, 2), np.float64)
        assert client.report(out.transition_id, executed_actions=ok, intervened=True)["ok"]


def test_huge_finite_rewards_are_clamped_and_counted(server, tmp_path):
    rng = np.random.default_rng(3)
    with PolicyClient(server.endpoint, robot_id="arm-1", timeout_s=5.0) as client:
        out = client.infer(_obs(rng))
        client.report(out.transition_id, reward=1e308)
        client.report(out.transition_id, reward=1e308)  # two would sum to inf
        out2 = client.infer(_obs(rng))
        client.report(out2.transition_id, reward=-5.0)
    clamped = server.metrics.registry.get_sample_value("openpi_rl_server_rewards_clamped_total")
    assert clamped == 2
    server.close(wait_s=30)
    with ReplayReader(tmp_path / "replay") as r:
        assert [row.reward for row in r.transitions()] == [2000.0, -5.0]


def test_a_report_is_acknowledged_only_once_committed(tmp_path):
    # A 10 s commit interval: an acknowledgement that did not wait for its commit would come
    # long before the row shows its reward to another process's reader.
    srv, thread = _start(tmp_path, commit_interval_s=10.0)
    try:
        rng = np.random.default_rng(4)
        with PolicyClient(srv.endpoint, robot_id="arm-1", timeout_s=5.0) as client:
            out = client.infer(_obs(rng))
            t0 = time.monotonic()
            assert client.report(out.transition_id, reward=3.0, done=True)["ok"] is True
            assert time.monotonic() - t0 < 5.0
            with ReplayReader(tmp_path / "replay") as r:
                (row,) = r.transitions()
                assert (row.reward, row.done) == (3.0, True)
    finally:
        srv.close()
        thread.join(30)


def test_a_restarted_server_keeps_its_robots_transitions_and_steps(tmp_path):
    rng = np.random.default_rng(5)
    srv, thread = _start(tmp_path)
    with PolicyClient(srv.endpoint, robot_id="arm-1", timeout_s=5.0) as client:
        first = [client.infer(_obs(rng), episode_id="e1").transition_id for _ in range(3)]
    srv.close()
    thread.join(30)
    srv, thread = _start(tmp_path)
    try:
        with PolicyClient(srv.endpoint, robot_id="arm-1", timeout_s=5.0) as client:
            assert client.report(first[-1], reward=2.0, done=False)["ok"] is True
            later = client.infer(_obs(rng), episode_id="e1").transition_id
        other = PolicyClient(srv.endpoint, robot_id="arm-2", timeout_s=5.0)
        with other, pytest.raises(ServerError, match="unknown_transition"):
            other.report(first[0], reward=1.0)
    finally:
        srv.close()
        thread.join(30)
    with ReplayReader(tmp_path / "replay") as r:
        rows = {row.id: row for row in r.transitions()}
        assert rows[first[-1]].reward == 2.0 and rows[later].step == 3


def test_per_robot_state_is_bounded_by_max_robots(tmp_path):
    srv, thread = _start(tmp_path, max_robots=8, report_window=4)
    try:
        rng = np.random.default_rng(6)
        ids = {}
        for i in range(40):  # 40 robot ids, 2 transitions each: memory for 8 robots
            with PolicyClient(srv.endpoint, robot_id=f"r{i}", timeout_s=5.0) as c:
                ids[i] = [c.infer(_obs(rng)).transition_id for _ in range(2)]
                c.report(ids[i][-1], reward=1.0, done=True)
        assert len(srv.robots) == 8 and srv.robots.evicted == 32
        assert srv.returns.open_episodes <= 8
        c = PolicyClient(srv.endpoint, robot_id="r0", timeout_s=5.0)
        with c, pytest.raises(ServerError, match="unknown_transition"):
            c.report(ids[0][0], reward=1.0)  # forgotten with r0
        with PolicyClient(srv.endpoint, robot_id="r39", timeout_s=5.0) as c:
            assert c.report(ids[39][0], reward=1.0)["ok"] is True
    finally:
        srv.close()
        thread.join(30)


def test_a_dead_replay_writer_fails_health_and_ends_the_server(tmp_path):
    srv, thread = _start(tmp_path)
    rng = np.random.default_rng(7)
    with PolicyClient(srv.endpoint, robot_id="arm-1", timeout_s=5.0, retries=0) as client:
        client.infer(_obs(rng))
        # The store breaks under the server (a disk fault): its database file is garbage.
        db = tmp_path / "replay" / "replay.sqlite"
        with open(db, "r+b") as f:
            f.write(rng.bytes(8192))
        for name in ("replay.sqlite-wal", "replay.sqlite-shm"):
            with open(tmp_path / "replay" / name, "r+b") as f:
                f.write(rng.bytes(4096))
        deadline = time.monotonic() + 20
        while srv.failure is None and time.monotonic() < deadline:
            with contextlib.suppress(ServerError):
                client.infer(_obs(rng))
            time.sleep(0.05)
    assert srv.failure is not None and "replay writer failed" in srv.failure
    thread.join(30)
    assert not thread.is_alive()  # run() ended: the process exits non-zero


def test_a_watched_front_end_that_dies_fails_health_and_ends_the_server(tmp_path):
    srv, thread = _start(tmp_path)
    front = threading.Thread(target=lambda: None, name="front")  # ends at once: "died"
    front.start()
    front.join()
    with PolicyClient(srv.endpoint, robot_id="arm-1", timeout_s=5.0) as client:
        assert client.health()["status"] == "ready"
        srv.watch("openpi-ws", front.is_alive)
        thread.join(10)
    assert not thread.is_alive() and srv.failure == "openpi-ws thread died (see the log)"
