"""10,000 seeded malformed frames at the ZMQ server: each gets an error reply (or, for frames
with no envelope to answer, a counted drop), and a good request afterwards succeeds."""

import threading

import jax
import msgpack
import numpy as np
import pytest
import zmq

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.policy_server.server import PolicyServer, ServeOptions
from openpi_rl.rl import ActorCritic
from openpi_rl_client import PROTOCOL_VERSION, wire

CONFIG = GaussianMLPConfig(obs_dim=4, action_dim=1)
GOOD = {
    "type": "infer",
    "protocol_version": PROTOCOL_VERSION,
    "robot_id": "r",
    "episode_id": "e",
    "observation": {"state": np.zeros(4, np.float32)},
}


def _malformed(rng: np.random.Generator, i: int) -> bytes:
    kind = i % 10
    good = wire.packb(GOOD)
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 300)))  # random bytes
    if kind == 1:
        return good[: int(rng.integers(1, len(good)))]  # truncated msgpack
    if kind == 2:
        return msgpack.packb(
            {**GOOD, "observation": {"state": [1, 2, 3, 4]}}, default=str
        )  # wrong type
    if kind == 3:
        return wire.packb({**GOOD, "observation": {"state": np.full(4, np.nan, np.float32)}})  # NaN
    if kind == 4:
        return wire.packb(
            {**GOOD, "observation": {"state": np.zeros(int(rng.integers(5, 50)), np.float32)}}
        )  # shape
    if kind == 5:
        return wire.packb(
            {**GOOD, "type": rng.choice(["dance", "", "INFER", "report2"])}
        )  # unknown type
    if kind == 6:
        return wire.packb({**GOOD, "protocol_version": int(rng.integers(2, 99))})  # version
    if kind == 7:
        return msgpack.packb(
            {b"__ndarray__": True, b"data": b"\x00" * 3, b"dtype": "<f4", b"shape": [1000, 1000]}
        )
    if kind == 8:
        return wire.packb([GOOD, 1, "x"])  # not a map
    return wire.packb(
        {**GOOD, "observation": {"state": np.zeros(4, np.float64), "extra": np.zeros(2)}}
    )


@pytest.fixture
def server():
    ac = ActorCritic(CONFIG.create(jax.random.key(0)), value_in_dim=4, value_hidden=(8,))
    # No rate limit here: every frame must reach the decoder (tests/security covers the limit).
    options = ServeOptions(
        endpoint="tcp://127.0.0.1:*", max_batch=4, max_message_bytes=64 * 1024, rate_limit_per_s=0
    )
    srv = PolicyServer(ac, options)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    srv.wait_ready(60)
    yield srv
    srv.close(wait_s=10)


def test_ten_thousand_malformed_frames_each_get_an_error_and_serving_goes_on(server):
    rng = np.random.default_rng(0)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    codes: dict[str, int] = {}
    oversize = b"\x00" * (65 * 1024)
    for i in range(10_000):
        payload = oversize if i % 1000 == 999 else _malformed(rng, i)
        sock.send_multipart([b"", payload])
        assert sock.poll(5000), f"no reply to malformed frame {i}"
        reply = wire.unpackb(sock.recv_multipart()[-1])
        assert set(reply) <= {"error", "request_id"}, reply
        codes[reply["error"]["code"]] = codes.get(reply["error"]["code"], 0) + 1
    assert sum(codes.values()) == 10_000
    assert {
        "bad_message",
        "invalid_observation",
        "unknown_type",
        "bad_version",
        "too_large",
    } <= set(codes)
    errors = sum(
        s.value
        for m in server.metrics.errors.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )
    assert errors == 10_000  # every error reply is counted
    sock.close(0)
    # A good robot on its own connection.
    good_sock = zmq.Context.instance().socket(zmq.DEALER)
    good_sock.setsockopt(zmq.LINGER, 0)
    good_sock.connect(server.endpoint)
    good_sock.send_multipart([b"", wire.packb(GOOD)])
    assert good_sock.poll(5000)
    good = wire.unpackb(good_sock.recv_multipart()[-1])
    assert "actions" in good, good
    assert good["actions"].shape == (1, 1)
    good_sock.close(0)
