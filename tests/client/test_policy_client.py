"""PolicyClient against a real ZMQ ROUTER server thread on a free loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zmq

from openpi_rl_client import (
    ActionChunkBroker,
    PolicyClient,
    PolicyTimeout,
    ServerError,
    error_reply,
    packb,
    unpackb,
    validate_request,
)
from openpi_rl_client.protocol import ProtocolError

H, D = 10, 7
CHUNK = np.arange(H * D, dtype=np.float32).reshape(H, D)

# A handler gets (request number, decoded request) and returns the replies to send, each as
# (delay_s, reply dict); an empty list drops the request.
Handler = Callable[[int, dict], list[tuple[float, dict]]]


def protocol_handler(n: int, msg: dict) -> list[tuple[float, dict]]:
    kind, msg = validate_request(msg)
    rid = {"request_id": msg["request_id"]}
    if kind == "infer":
        reply = {
            "actions": CHUNK,
            "policy_version": 4,
            "transition_id": 100 + n,
            "server_timing": {"queue_ms": 0.1, "infer_ms": 1.0},
        }
    elif kind == "report":
        if msg["transition_id"] >= 1000:
            return [(0.0, {**error_reply("unknown_transition", "no such transition"), **rid})]
        reply = {"ok": True}
    elif kind == "metadata":
        reply = {
            "obs_spec": {"state": {"shape": [D], "dtype": "float32", "optional": False}},
            "action_horizon": H,
            "action_dim": D,
            "policy_version": 4,
        }
    else:
        reply = {"status": "ready", "policy_version": 4}
    return [(0.0, {**reply, **rid})]


class Server:
    """A ROUTER loop on its own thread; records every decoded request."""

    def __init__(self, handler: Handler, curve_secret: bytes | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        if curve_secret is not None:
            self.sock.curve_server = True
            self.sock.curve_secretkey = curve_secret
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.handler = handler
        self.requests: list[dict] = []
        self.identities: list[bytes] = []
        self.sent = 0  # replies sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-router", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending: list[tuple[float, list[bytes]]] = []  # (send at, frames)
        while not self._stop.is_set():
            if self.sock.poll(5, zmq.POLLIN):
                identity, delimiter, payload = self.sock.recv_multipart()
                assert delimiter == b""
                try:
                    msg = unpackb(payload)
                    self.requests.append(msg)
                    self.identities.append(identity)
                    replies = self.handler(len(self.requests) - 1, msg)
                except ProtocolError as e:
                    replies = [(0.0, e.reply())]
                now = time.monotonic()
                for delay, reply in replies:
                    pending.append((now + delay, [identity, b"", packb(reply)]))
            now = time.monotonic()
            for item in [p for p in pending if p[0] <= now]:
                pending.remove(item)
                self.sock.send_multipart(item[1])
                self.sent += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(handler: Handler = protocol_handler, **kw) -> Server:
        servers.append(Server(handler, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_round_trips_of_all_message_types(serve):
    server = serve()
    with PolicyClient(server.endpoint, robot_id="arm0", timeout_s=2.0) as client:
        obs = {"state": np.ones(D, np.float32), "img": np.zeros((8, 8, 3), np.uint8)}
        result = client.infer(obs, prompt="pick")
        assert np.array_equal(result.actions, CHUNK) and result.actions.dtype == np.float32
        assert (result.policy_version, result.transition_id) == (4, 100)
        assert result.server_timing == {"queue_ms": 0.1, "infer_ms": 1.0}
        assert client.report(result.transition_id, reward=1.5, done=True) == {
            "ok": True,
            "request_id": server.requests[1]["request_id"],
        }
        assert client.metadata()["action_horizon"] == H
        assert client.health()["status"] == "ready"

        first_episode = client.episode_id
        assert client.reset() != first_episode and len(client.episode_id) == 32
        client.infer(obs)
        client.report(7, executed_actions=np.zeros((H, D), np.float32), intervened=True)

    infer, report = server.requests[0], server.requests[1]
    assert infer["robot_id"] == "arm0" and infer["protocol_version"] == 1
    assert infer["episode_id"] == first_episode and infer["prompt"] == "pick"
    assert np.array_equal(infer["observation"]["state"], obs["state"])
    assert report == {
        "type": "report", "transition_id": 100, "reward": 1.5, "done": True, "truncated": False,
        "intervened": False, "protocol_version": 1, "robot_id": "arm0",
        "request_id": report["request_id"],
    }  # fmt: skip
    assert server.requests[4]["episode_id"] == client.episode_id
    assert server.requests[5]["intervened"] is True
    assert server.requests[5]["executed_actions"].shape == (H, D)
    assert len({r["request_id"] for r in server.requests}) == len(server.requests)


def test_server_error_reply_raises_server_error(serve):
    server = serve()
    with PolicyClient(server.endpoint, timeout_s=2.0) as client:
        with pytest.raises(ServerError) as info:
            client.report(1234, reward=1.0)
        assert info.value.code == "unknown_transition"
        assert "no such transition" in str(info.value)
        assert client.health()["status"] == "ready"  # the connection keeps serving


def test_dropped_request_is_retried_on_a_fresh_socket(serve):
    def drop_first(n, msg):
        return [] if n == 0 else protocol_handler(n, msg)

    server = serve(drop_first)
    with PolicyClient(server.endpoint, timeout_s=0.2, retries=3) as client:
        result = client.infer({"state": np.zeros(D, np.float32)})
        assert result.transition_id == 101
        assert client.reconnects == 1
    # Same request resent with the same id, from a new socket (new identity).
    assert server.requests[0]["request_id"] == server.requests[1]["request_id"]
    assert server.identities[0] != server.identities[1]


def test_silent_server_raises_policy_timeout_after_all_retries(serve):
    server = serve(lambda n, msg: [])
    timeout_s, retries = 0.1, 2
    with PolicyClient(server.endpoint, timeout_s=timeout_s, retries=retries) as client:
        start = time.monotonic()
        with pytest.raises(PolicyTimeout, match="3 attempts"):
            client.health()
        elapsed = time.monotonic() - start
    expected = timeout_s * (retries + 1)
    assert expected <= elapsed < expected + 0.5
    deadline = time.monotonic() + 1.0
    while len(server.requests) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server.requests) == retries + 1


def test_no_server_at_all_raises_policy_timeout():
    client = PolicyClient("tcp://127.0.0.1:1", timeout_s=0.05, retries=1)
    with client, pytest.raises(PolicyTimeout):
        client.health()


def test_late_reply_to_abandoned_request_is_not_returned_to_the_next_call(serve):
    def slow_first(n, msg):
        if n == 0:  # answered after the client gave up on it
            return [(0.4, reply) for _, reply in protocol_handler(n, msg)]
        return protocol_handler(n, msg)

    server = serve(slow_first)
    with PolicyClient(server.endpoint, timeout_s=0.15, retries=0) as client:
        with pytest.raises(PolicyTimeout):
            client.infer({"state": np.zeros(D, np.float32)})
        deadline = time.monotonic() + 5
        while server.sent < 1:  # the late reply (transition 100) is sent meanwhile
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert client.infer({"state": np.zeros(D, np.float32)}).transition_id == 101


def test_stale_reply_on_the_same_socket_is_discarded(serve):
    """Even a reply that reaches this socket out of turn (wrong request id) is skipped."""

    def stale_then_real(n, msg):
        stale = {
            "actions": CHUNK * 0,
            "policy_version": 1,
            "transition_id": -1,
            "request_id": "old-1",
        }
        return [(0.0, stale), *protocol_handler(n, msg)]

    server = serve(stale_then_real)
    with PolicyClient(server.endpoint, timeout_s=1.0) as client:
        result = client.infer({"state": np.zeros(D, np.float32)})
        assert result.transition_id == 100 and np.array_equal(result.actions, CHUNK)
        assert client.reconnects == 0


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_encrypted_round_trip(serve):
    server_public, server_secret = zmq.curve_keypair()
    server = serve(curve_secret=server_secret)
    with PolicyClient(server.endpoint, timeout_s=2.0, curve_server_key=server_public) as client:
        assert client.health()["status"] == "ready"
    wrong_public, _ = zmq.curve_keypair()
    with (
        PolicyClient(server.endpoint, timeout_s=0.1, retries=0, curve_server_key=wrong_public) as c,
        pytest.raises(PolicyTimeout),
    ):
        c.health()


def test_broker_fed_by_a_policy_client(serve):
    server = serve()
    with (
        PolicyClient(server.endpoint, timeout_s=2.0) as client,
        ActionChunkBroker.from_client(client, inference_delay=3, prompt="pick") as broker,
    ):
        actions = [broker.step({"state": np.zeros(D, np.float32)}) for _ in range(2 * H)]
        assert broker.current.transition_id >= 101  # a second chunk is playing
    assert np.array_equal(actions[0], CHUNK[0]) and actions[0].shape == (D,)
    assert all(r["prompt"] == "pick" for r in server.requests)
