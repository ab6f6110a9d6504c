"""The human-feedback reward providers against real peers: a terminal (pty), a WebSocket
server and an HTTP server on loopback."""

from __future__ import annotations

import http.server
import io
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import pytest
import websockets.exceptions
import websockets.sync.server

from openpi_rl.rl.reward import (
    HumanRewardCLI,
    HumanRewardHTTP,
    HumanRewardWebSocket,
    RewardConfig,
    RewardError,
)
from tests._net import free_port


def _step(seed: int = 0) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    observation = {"state": rng.standard_normal(4).astype(np.float32), "prompt": "pick"}
    actions = rng.uniform(-0.1, 0.1, size=(2, 3)).astype(np.float32)
    return observation, actions


# --------------------------------------------------------------------------------------------
# HumanRewardCLI


def test_cli_reasks_until_a_number_in_range():
    out = io.StringIO()
    provider = HumanRewardCLI(input_stream=io.StringIO("abc\nnan\n2\n\n-0.5\n"), output_stream=out)
    assert provider.get({"state": np.arange(3.0), "image": np.zeros((8, 8, 3))}, np.ones((2, 7)))
    text = out.getvalue()
    assert text.count("Enter reward [-1, 1]: ") == 5
    assert "Not a number: 'abc'" in text
    assert "must be finite" in text
    assert "Out of range: 2 is not in [-1, 1]" in text
    # The summary shows keys with shapes, and small values.
    assert "state: float64 [3] [0, 1, 2]" in text
    assert "image: float64 [8, 8, 3]" in text
    assert "Actions: float64 [2, 7] [1, 1, 1, 1, 1, 1, ...]" in text


def test_cli_answer_is_returned():
    provider = HumanRewardCLI(
        config=RewardConfig(min_reward=0.0, max_reward=10.0),
        input_stream=io.StringIO("7.5\n"),
        output_stream=io.StringIO(),
    )
    assert provider.get(*_step()) == 7.5


def test_cli_end_of_input_raises():
    provider = HumanRewardCLI(input_stream=io.StringIO("oops\n"), output_stream=io.StringIO())
    with pytest.raises(RewardError, match="end of input"):
        provider.get(*_step())


# The child is what an operator's terminal runs: the provider, reading its own tty.
_CHILD = """
import numpy as np
from openpi_rl.rl.reward import HumanRewardCLI
value = HumanRewardCLI().get({"state": np.arange(3.0)}, np.ones((2, 3)))
print(f"RESULT {value!r}", flush=True)
"""


def _read_until(fd: int, needle: bytes, buffer: bytearray, count: int = 1) -> None:
    """Reads the terminal into `buffer` until `needle` has appeared `count` times."""
    deadline = time.monotonic() + 10.0
    while buffer.count(needle) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {bytes(buffer)!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"terminal closed before {needle!r}; got {bytes(buffer)!r}")
            buffer += chunk


def test_cli_on_a_real_terminal_reasks_then_returns():
    master, slave = os.openpty()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    try:
        seen = bytearray()
        _read_until(master, b"Enter reward [-1, 1]: ", seen)
        assert b"state: float64 [3] [0, 1, 2]" in seen
        os.write(master, b"lots\n")
        _read_until(master, b"Not a number: 'lots'", seen)
        _read_until(master, b"Enter reward [-1, 1]: ", seen, count=2)
        os.write(master, b"0.25\n")
        _read_until(master, b"RESULT 0.25", seen)
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)


def test_cli_refuses_stdin_that_is_not_a_terminal():
    result = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input="0.5\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "RewardError: HumanRewardCLI: stdin is not a terminal" in result.stderr


# --------------------------------------------------------------------------------------------
# HumanRewardWebSocket against a real websockets server


class _WsServer:
    """Routes by path: /sum answers sum(actions) + observation["offset"] after
    observation["delay_s"]; /close answers then closes; others answer a fixed bad reply."""

    FIXED: ClassVar[dict[str, str]] = {
        "/not_json": "reward: 1",
        "/no_key": json.dumps({"value": 0.5}),
        "/error": json.dumps({"error": {"code": "busy", "message": "operator away"}}),
        "/text_reward": json.dumps({"reward": "high"}),
    }

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.connections = 0
        self.stop = threading.Event()  # cuts a delayed reply short at teardown
        self._server = websockets.sync.server.serve(self._handle, "127.0.0.1", 0)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="test-ws-server", daemon=True
        )
        self._thread.start()
        self.base = f"ws://127.0.0.1:{self._server.socket.getsockname()[1]}"

    def _handle(self, ws) -> None:
        self.connections += 1
        path = ws.request.path
        try:
            for message in ws:
                data = json.loads(message)
                self.received.append(data)
                if path in self.FIXED:
                    ws.send(self.FIXED[path])
                    continue
                self.stop.wait(data["observation"].get("delay_s", 0.0))
                reward = float(np.sum(data["actions"])) + data["observation"].get("offset", 0.0)
                ws.send(json.dumps({"reward": reward}))
                if path == "/close":
                    ws.close()
                    return
        except websockets.exceptions.ConnectionClosed:
            pass  # the client gave up waiting; the late reply has nowhere to go

    def close(self) -> None:
        self.stop.set()
        self._server.shutdown()
        self._thread.join(timeout=5)


@pytest.fixture
def ws_server() -> Iterator[_WsServer]:
    server = _WsServer()
    yield server
    server.close()


def test_websocket_request_carries_observation_and_actions(ws_server):
    observation = {
        "state": np.array([0.5, np.nan], dtype=np.float32),
        "image": {"wrist": np.arange(6, dtype=np.uint8).reshape(1, 2, 3)},
        "step": np.int64(7),
        "prompt": "pick up the cube",
        "raw": b"\x00\xff",
        "offset": 0.25,
    }
    actions = np.array([[0.1, 0.2], [0.3, -0.4]], dtype=np.float32)
    with HumanRewardWebSocket(f"{ws_server.base}/sum", timeout_s=5) as provider:
        assert provider.get(observation, actions) == pytest.approx(0.2 + 0.25)
    (request,) = ws_server.received
    assert request["observation"] == {
        "state": [0.5, None],  # NaN has no JSON spelling
        "image": {"wrist": [[[0, 1, 2], [3, 4, 5]]]},
        "step": 7,
        "prompt": "pick up the cube",
        "raw": "AP8=",  # base64
        "offset": 0.25,
    }
    np.testing.assert_allclose(request["actions"], actions)


def test_websocket_keeps_one_connection(ws_server):
    with HumanRewardWebSocket(f"{ws_server.base}/sum", timeout_s=5) as provider:
        for seed in range(3):
            observation, actions = _step(seed)
            assert provider.get(observation, actions) == pytest.approx(float(actions.sum()))
    assert ws_server.connections == 1


def test_websocket_reconnects_when_server_closed_connection(ws_server):
    with HumanRewardWebSocket(f"{ws_server.base}/close", timeout_s=5) as provider:
        assert provider.get({"offset": 0.5}, np.zeros((1, 2))) == 0.5
        assert provider.get({"offset": -0.5}, np.zeros((1, 2))) == -0.5
    assert ws_server.connections == 2


def test_websocket_timeout_without_default_raises_with_url(ws_server):
    url = f"{ws_server.base}/sum"
    provider = HumanRewardWebSocket(url, timeout_s=0.3)
    with pytest.raises(RewardError, match=f"no reward from {url} within 0.3 s"):
        provider.get({"delay_s": 5.0}, np.zeros((1, 1)))
    provider.close()


def test_websocket_timeout_returns_default_and_late_reply_is_not_reused(ws_server):
    with HumanRewardWebSocket(f"{ws_server.base}/sum", timeout_s=0.3, default_reward=-0.3) as p:
        assert p.get({"delay_s": 1.0, "offset": 0.9}, np.zeros((1, 1))) == -0.3
        # The next step must get its own answer, not the late 0.9.
        assert p.get({"offset": 0.1}, np.zeros((1, 1))) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("/not_json", "reply is not JSON"),
        ("/no_key", r'expected a reply \{"reward": <number>\}'),
        ("/error", "server answered with an error: .*operator away"),
        ("/text_reward", "expected a finite number, got 'high'"),
    ],
)
def test_websocket_malformed_reply_raises(ws_server, path, match):
    with (
        HumanRewardWebSocket(f"{ws_server.base}{path}", timeout_s=5, default_reward=0.0) as p,
        pytest.raises(RewardError, match=match),
    ):
        p.get(*_step())


def test_websocket_unreachable_server_raises_even_with_default():
    url = f"ws://127.0.0.1:{free_port()}"
    with pytest.raises(RewardError, match="cannot connect"):
        HumanRewardWebSocket(url, timeout_s=1, default_reward=0.0).get(*_step())


# --------------------------------------------------------------------------------------------
# HumanRewardHTTP against a real HTTP server


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    received: list[dict]
    stop: threading.Event  # cuts a delayed reply short at teardown

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        data = json.loads(body)
        self.received.append({"content_type": self.headers["Content-Type"], **data})
        if self.path == "/boom":
            self._reply(500, b"internal failure")
            return
        if self.path == "/not_json":
            self._reply(200, b"<html>ok</html>")
            return
        self.stop.wait(data["observation"].get("delay_s", 0.0))
        reward = float(np.sum(data["actions"])) + data["observation"].get("offset", 0.0)
        self._reply(200, json.dumps({"reward": reward}).encode())

    def _reply(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client timed out and left

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_url() -> Iterator[tuple[str, list[dict]]]:
    received: list[dict] = []
    stop = threading.Event()
    handler = type("Handler", (_HttpHandler,), {"received": received, "stop": stop})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="test-http-server", daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    stop.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_http_posts_json_and_reads_reward(http_url):
    base, received = http_url
    observation, actions = _step(3)
    with HumanRewardHTTP(f"{base}/sum", timeout_s=5) as provider:
        assert provider.get(observation, actions) == pytest.approx(float(actions.sum()), abs=1e-6)
    (request,) = received
    assert request["content_type"] == "application/json"
    assert request["observation"]["state"] == pytest.approx(observation["state"].tolist())
    assert request["observation"]["prompt"] == "pick"
    np.testing.assert_allclose(request["actions"], actions)


def test_http_reward_is_clamped(http_url):
    base, _ = http_url
    assert HumanRewardHTTP(f"{base}/sum").get({"offset": 4.0}, np.zeros((1, 1))) == 1.0


def test_http_server_error_raises_with_status(http_url):
    base, _ = http_url
    with pytest.raises(RewardError, match=r"HTTP 500 .*internal failure"):
        HumanRewardHTTP(f"{base}/boom", timeout_s=5, default_reward=0.0).get(*_step())


def test_http_malformed_reply_raises(http_url):
    base, _ = http_url
    with pytest.raises(RewardError, match="reply is not JSON"):
        HumanRewardHTTP(f"{base}/not_json", timeout_s=5).get(*_step())


def test_http_timeout_raises_or_returns_default(http_url):
    base, _ = http_url
    url = f"{base}/sum"
    with pytest.raises(RewardError, match=f"no reward from {url} within 0.3 s"):
        HumanRewardHTTP(url, timeout_s=0.3).get({"delay_s": 5.0}, np.zeros((1, 1)))
    provider = HumanRewardHTTP(url, timeout_s=0.3, default_reward=0.2)
    assert provider.get({"delay_s": 5.0}, np.zeros((1, 1))) == 0.2


def test_http_unreachable_server_raises():
    with pytest.raises(RewardError, match="cannot reach server"):
        HumanRewardHTTP(f"http://127.0.0.1:{free_port()}/", timeout_s=1).get(*_step())
