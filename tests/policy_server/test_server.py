"""The ZMQ policy server on loopback, driven by the robot client over real sockets."""

import sqlite3
import threading
import time
import zlib

import jax
import msgpack
import numpy as np
import pytest
import zmq

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.policy_server.server import PolicyServer, ServeOptions
from openpi_rl.replay import ReplayConfig, ReplayReader
from openpi_rl.rl import ActorCritic
from openpi_rl_client import PolicyClient, ServerError, wire

CONFIG = GaussianMLPConfig(obs_dim=6, action_dim=2, action_horizon=4)


@pytest.fixture
def server(tmp_path):
    ac = ActorCritic(CONFIG.create(jax.random.key(0)), value_in_dim=6, value_hidden=(16,))
    srv = PolicyServer(
        ac,
        ServeOptions(endpoint="tcp://127.0.0.1:*", max_batch=4),
        ReplayConfig(path=str(tmp_path / "replay"), commit_interval_s=0.02),
    )
    thread = threading.Thread(target=srv.run, name="server", daemon=True)
    thread.start()
    srv.wait_ready(60)
    yield srv
    srv.close()
    thread.join(30)
    assert not thread.is_alive()


def _obs(rng):
    return {"state": rng.standard_normal(6).astype(np.float32)}


def test_infer_returns_the_declared_chunk_and_every_reply_is_a_stored_transition(server, tmp_path):
    rng = np.random.default_rng(0)
    with PolicyClient(server.endpoint, robot_id="r1", timeout_s=5.0) as client:
        meta = client.metadata()
        assert (meta["action_horizon"], meta["action_dim"]) == (4, 2)
        assert client.health()["status"] == "ready"
        ids, sent = [], {}
        for _ in range(20):
            obs = _obs(rng)
            out = client.infer(obs, episode_id="e1", prompt="stack the cups")
            assert out.actions.shape == (4, 2) and out.actions.dtype == np.float32
            ids.append(out.transition_id)
            sent[out.transition_id] = obs
            client.report(out.transition_id, reward=1.0, done=len(ids) == 20)
    server.close(wait_s=30)  # a graceful stop flushes the replay queue
    reader = ReplayReader(str(tmp_path / "replay"))
    rows = reader.transitions(robot_id="r1")
    assert sorted(r.id for r in rows) == sorted(ids)
    assert [r.step for r in sorted(rows, key=lambda r: r.id)] == list(range(20))
    assert all(r.reward == 1.0 for r in rows) and sum(r.done for r in rows) == 1
    for row in rows:  # the replay's record: the model's arrays and the prompt, not the request
        stored = reader.stored_observation(row)
        assert stored.arrays.keys() == {"state"} and stored.prompt == "stack the cups"
        np.testing.assert_array_equal(stored.arrays["state"], sent[row.id]["state"])


def test_bad_requests_get_error_replies_and_the_server_keeps_serving(server):
    rng = np.random.default_rng(1)
    with PolicyClient(server.endpoint, robot_id="r2", timeout_s=5.0) as client:
        with pytest.raises(ServerError) as e:
            client.infer({"state": np.zeros(5, np.float32)})
        assert e.value.code == "invalid_observation" and "expected float32 [6]" in e.value.message
        with pytest.raises(ServerError) as e:
            client.infer({"state": np.full(6, np.nan, np.float32)})
        assert e.value.code == "invalid_observation"
        assert client.infer(_obs(rng)).actions.shape == (4, 2)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.connect(server.endpoint)
    for payload in (b"\xc1garbage", msgpack.packb({"type": "dance"}), msgpack.packb([1, 2]), b""):
        raw.send_multipart([b"", payload])
        assert raw.poll(5000)
        reply = wire.unpackb(raw.recv_multipart()[-1])
        assert "error" in reply and reply["error"]["code"]
    raw.close(0)


def test_four_robots_at_50_hz_every_reply_is_stored(server, tmp_path):
    import time

    replies, errors = [], []

    def robot(name: str) -> None:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        with PolicyClient(server.endpoint, robot_id=name, timeout_s=2.0) as client:
            next_tick = time.monotonic()
            end = next_tick + 10.0
            while next_tick < end:
                try:
                    replies.append(client.infer(_obs(rng), episode_id="e").transition_id)
                except Exception as e:  # counted, the assertion below names them
                    errors.append(repr(e))
                next_tick += 0.02
                time.sleep(max(0.0, next_tick - time.monotonic()))

    threads = [threading.Thread(target=robot, args=(f"robot{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.close(wait_s=30)
    assert errors == []
    assert len(replies) >= 4 * 450  # 500 ticks each; a late tick is not skipped, only delayed
    stored = ReplayReader(str(tmp_path / "replay")).count()
    assert stored == len(replies) == len(set(replies))


def _raw_request(endpoint: str, payload: bytes, read: bool) -> dict | None:
    """Send on a fresh DEALER (as a lazy-pirate retry does); optionally wait for the reply."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart([b"", payload])
    reply = None
    if read:
        assert sock.poll(5000)
        reply = wire.unpackb(sock.recv_multipart()[-1])
    sock.close(0)
    return reply


def _start(tmp_path, **options):
    ac = ActorCritic(CONFIG.create(jax.random.key(0)), value_in_dim=6, value_hidden=(16,))
    srv = PolicyServer(
        ac,
        ServeOptions(endpoint="tcp://127.0.0.1:*", **options),
        ReplayConfig(path=str(tmp_path / "replay"), commit_interval_s=0.02),
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    assert srv.wait_ready(60)
    return srv, thread


@pytest.mark.parametrize("pending", [False, True], ids=["after-reply", "while-queued"])
def test_a_resent_request_is_answered_once_and_stored_once(tmp_path, pending):
    # "while-queued": the server holds a lone request 300 ms for a batch, so the resend (from a
    # new socket, as the client's lazy-pirate retry does) arrives before it is served.
    srv, thread = _start(tmp_path, max_batch=4, max_wait_us=300_000 if pending else 200)
    rng = np.random.default_rng(3)
    head = {"protocol_version": 1, "robot_id": "r1", "episode_id": "e"}
    infer = wire.packb({**head, "type": "infer", "request_id": "s-1", "observation": _obs(rng)})
    if pending:
        abandoned = zmq.Context.instance().socket(zmq.DEALER)  # sends, never reads
        abandoned.connect(srv.endpoint)
        abandoned.send_multipart([b"", infer])
        deadline = time.monotonic() + 30
        while not srv.remembers("r1", "s-1"):
            assert time.monotonic() < deadline, "the first request never reached the server"
            time.sleep(0.005)  # until the server holds it
        second = _raw_request(srv.endpoint, infer, read=True)
        abandoned.close(0)
        first = second
    else:
        first = _raw_request(srv.endpoint, infer, read=True)
        second = _raw_request(srv.endpoint, infer, read=True)
    assert second["transition_id"] == first["transition_id"]
    np.testing.assert_array_equal(second["actions"], first["actions"])
    tid = first["transition_id"]
    report = wire.packb(
        {
            **head,
            "type": "report",
            "request_id": "s-2",
            "transition_id": tid,
            "reward": 1.5,
            "done": False,
            "truncated": False,
        }
    )
    assert _raw_request(srv.endpoint, report, read=True)["ok"]
    assert _raw_request(srv.endpoint, report, read=True)["ok"]
    # A new request_id is a new request.
    fresh = wire.packb({**head, "type": "infer", "request_id": "s-3", "observation": _obs(rng)})
    assert _raw_request(srv.endpoint, fresh, read=True)["transition_id"] != tid
    dupes = {
        s.labels["type"]: s.value
        for m in srv.metrics.registry.collect()
        if m.name == "openpi_rl_server_duplicate_requests"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert dupes == {"infer": 1.0, "report": 1.0}
    srv.close(wait_s=30)
    thread.join(30)
    rows = ReplayReader(str(tmp_path / "replay")).transitions(robot_id="r1")
    assert len(rows) == 2 and len({r.id for r in rows}) == 2
    assert {r.id: r.reward for r in rows}[tid] == 1.5  # the resent report counted once


def test_the_key_sets_robots_send_are_compiled_before_ready(tmp_path):
    # pi0_fast's images and prompt are optional: a robot sending cameras + state without a
    # prompt must not make the serving loop compile (seconds of stall for every robot).
    from openpi_rl.models.pi0_fast import Pi0FASTConfig

    config = Pi0FASTConfig(variant="dummy", image_keys=("cam",), image_size=32, state_dim=4)
    ac = ActorCritic(config.create(jax.random.key(0)), value_in_dim=config.value_in_dim)
    srv = PolicyServer(
        ac,
        ServeOptions(endpoint="tcp://127.0.0.1:*", max_batch=1, warm_key_sets=(("state",),)),
        None,
    )
    warmed = {frozenset(k) for k in srv.key_sets}
    assert warmed >= {frozenset({"cam", "state"}), frozenset({"state"}), frozenset(config.obs_spec)}
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    assert srv.wait_ready(120)
    compiled = srv.snapshot.compilations
    rng = np.random.default_rng(0)
    with PolicyClient(srv.endpoint, robot_id="r", timeout_s=30.0) as client:
        obs = {"cam": rng.integers(0, 256, (32, 32, 3), np.uint8), "state": np.ones(4, np.float32)}
        assert client.infer(obs).actions.shape == (10, 7)
        assert client.infer({"state": np.ones(4, np.float32)}).actions.shape == (10, 7)
    assert srv.snapshot.compilations == compiled
    srv.close(wait_s=30)
    thread.join(30)
    with pytest.raises(ValueError, match="not in the model's obs_spec"):
        PolicyServer(ac, ServeOptions(endpoint="tcp://127.0.0.1:*", warm_key_sets=(("x",),)))


def test_a_full_replay_queue_is_answered_overloaded_and_nothing_served_is_lost(tmp_path):
    """While the disk cannot keep up (here: another connection holds SQLite's write lock), the
    writer's queue fills; the server then refuses infers with `overloaded` instead of answering
    with transitions it could not queue, keeps answering other requests, and serves again once
    the queue drains. Every infer that got actions is a stored transition."""
    replay_dir = tmp_path / "replay"
    ac = ActorCritic(CONFIG.create(jax.random.key(0)), value_in_dim=6, value_hidden=(16,))
    srv = PolicyServer(
        ac,
        ServeOptions(endpoint="tcp://127.0.0.1:*", max_batch=4),
        ReplayConfig(
            path=str(replay_dir), commit_interval_s=0.01, max_queue=8, enqueue_timeout_s=0.02
        ),
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    srv.wait_ready(60)
    rng = np.random.default_rng(0)
    served, refused = [], 0
    blocker = sqlite3.connect(replay_dir / "replay.sqlite", isolation_level=None)
    try:
        with PolicyClient(srv.endpoint, robot_id="r1", timeout_s=5.0) as client:
            blocker.execute("BEGIN IMMEDIATE")  # the writer's commits now wait
            for _ in range(400):
                try:
                    served.append(client.infer(_obs(rng), episode_id="e1").transition_id)
                except ServerError as e:
                    assert e.code == "overloaded" and "replay" in str(e)
                    refused += 1
                    break
            assert refused == 1, f"the queue never filled ({len(served)} served)"
            assert client.health()["status"] == "ready"  # other requests are still answered
            blocker.execute("COMMIT")
            deadline = time.monotonic() + 10
            while True:  # the queue drains; infers are served again
                try:
                    served.append(client.infer(_obs(rng), episode_id="e1").transition_id)
                    break
                except ServerError as e:
                    assert e.code == "overloaded" and time.monotonic() < deadline
                    time.sleep(0.05)
    finally:
        blocker.close()
        srv.close(wait_s=30)
        thread.join(30)
    reader = ReplayReader(str(replay_dir))
    assert sorted(r.id for r in reader.transitions(robot_id="r1")) == sorted(served)
    reader.close()
