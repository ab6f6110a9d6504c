"""The bridge's edges against hostile and unlucky input (issue 12): HTTP framing (h11), caps
enforced before the token is checked, numbers and ids checked before they reach the replay,
generic 500s, per-client shares behind a trusted proxy, bounded per-pendant state, fsync, and
a stage that dies taking the process down with it (non-zero exit) instead of serving on."""

import contextlib
import json
import socket
import sqlite3
import threading
import time
import urllib.request

import pytest
import websockets.exceptions
from websockets.sync.client import connect

from openpi_rl.replay import ReplayConfig, ReplayWriter
from openpi_rl.reward_bridge import BridgeConfig, RewardBridge, StepRewardRule
from tests.reward_bridge.conftest import OPERATORS, add_transitions, counted, pendant, recv_type
from tests.reward_bridge.test_bridge_kill import _start_bridge

TOKEN = OPERATORS["ana"]


def _raw(port: int, data: bytes, read_s: float = 10.0) -> bytes:
    """Send raw bytes, return what the server answers until it closes (or `read_s`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as s:
        s.sendall(data)
        out = b""
        with contextlib.suppress(TimeoutError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def _post(port: int, body: bytes, extra_headers: str = "", path: str = "/feedback") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n{extra_headers}\r\n"
    )
    return _raw(port, head.encode() + body)


def _stored(replay) -> list[tuple]:
    with sqlite3.connect(replay.root / "replay.sqlite") as conn:
        return conn.execute("SELECT robot_id, kind, value FROM reward_events").fetchall()


# ---- HTTP framing --------------------------------------------------------------------------


def test_conflicting_content_lengths_are_refused_and_nothing_is_stored(make_bridge, replay):
    """Two Content-Lengths are how requests get smuggled past a proxy: 400, not a guess."""
    bridge = make_bridge()
    body = json.dumps({"robot_id": "arm-1", "kind": "step_reward", "value": 1}).encode()
    reply = _post(bridge.http_port, body, f"Content-Length: 2\r\nContent-Length: {len(body)}\r\n")
    assert reply.startswith(b"HTTP/1.1 400"), reply[:80]
    # The same event sent properly is acknowledged once committed, after anything sent before.
    reply = _post(bridge.http_port, body, f"Content-Length: {len(body)}\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert _stored(replay) == [("arm-1", "step_reward", 1.0)]


def test_a_chunked_feedback_body_is_accepted(make_bridge, replay):
    add_transitions(replay, "arm-1", "ep-1", 1)
    bridge = make_bridge()
    body = json.dumps({"robot_id": "arm-1", "kind": "step_reward", "value": 1}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    reply = _post(bridge.http_port, chunked, "Transfer-Encoding: chunked\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["type"] == "ack"


def test_bodies_are_refused_on_the_head_before_they_are_read(make_bridge):
    """An unauthenticated client cannot make the bridge read (and hold) a large body: the
    answer comes before the body is sent."""
    bridge = make_bridge(query_token="q-secret-0123456789", handshake_timeout_s=30.0)
    t0 = time.monotonic()
    big = (
        b"POST /feedback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )  # over max_message_bytes (64 KiB), under the old 16 MiB cap for every body
    assert _raw(bridge.http_port, big).startswith(b"HTTP/1.1 413")
    no_token = b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Length: 8000000\r\n\r\n"
    assert _raw(bridge.http_port, no_token).startswith(b"HTTP/1.1 401")
    wrong = b"POST /feedback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
    assert _raw(bridge.http_port, wrong + b"Content-Length: 100\r\n\r\n").startswith(
        b"HTTP/1.1 401"
    )
    assert time.monotonic() - t0 < 10  # not the 30 s a body that never comes would take


def test_a_handler_bug_answers_a_generic_500_and_internal_error(tmp_path, replay):
    """A bridge whose rules miss a kind (a deployment bug): the client learns that it failed,
    not the exception's text (paths, internals); the log has it."""
    config = BridgeConfig(
        replay_dir=str(tmp_path / "replay"),
        ws_port=0,
        http_port=0,
        metrics_port=None,
        operators=OPERATORS,
    )
    bridge = RewardBridge(config, rules={"step_reward": StepRewardRule(0.0)}).start()
    try:
        body = json.dumps({"robot_id": "arm-1", "kind": "success"}).encode()
        reply = _post(bridge.http_port, body, f"Content-Length: {len(body)}\r\n")
        assert reply.startswith(b"HTTP/1.1 500")
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "internal"
        assert b"KeyError" not in reply and b"success'" not in reply
        with pendant(bridge) as ws:
            ws.send(body.decode())
            error = recv_type(ws, "error")["error"]
            assert error["code"] == "internal" and "KeyError" not in error["message"]
    finally:
        bridge.close()


# ---- numbers and ids at the edge -------------------------------------------------------------


BAD_EVENTS = [
    '{"robot_id": "\\ud800", "kind": "step_reward", "value": 1}',  # a lone surrogate
    '{"robot_id": "arm-1", "kind": "step_reward", "value": 1' + "0" * 400 + "}",  # 1e400 as int
    '{"robot_id": "arm-1", "kind": "step_reward", "value": 1e400}',
    '{"robot_id": "arm-1", "kind": "step_reward", "value": 1, "client_time": 1' + "0" * 400 + "}",
    '{"robot_id": "arm-1", "kind": "step_reward", "value": 1, "client_time": 1e300}',
    '{"robot_id": "arm-1", "kind": "step_reward", "value": 1, "idempotency_key": "\\udc80"}',
    '{"robot_id": "arm-1", "kind": "success", "episode_id": "ep\\u0000-1"}',
    '{"robot_id": "' + "r" * 129 + '", "kind": "step_reward", "value": 1}',
    '{"robot_id": "arm-1", "kind": ["step_reward"], "value": 1}',
    '{"robot_id": "arm-1", "kind": "step_reward", "value": "1"}',
]


def test_hostile_numbers_and_ids_get_bad_event_and_the_bridge_keeps_storing(make_bridge, replay):
    """Each is refused at the edge (`bad_event`), so none reaches the replay writer's commit
    (a lone surrogate there used to kill the writer: every later event `not_stored`)."""
    ids = add_transitions(replay, "arm-1", "ep-1", 1)
    bridge = make_bridge()
    with pendant(bridge) as ws:
        for frame in BAD_EVENTS:
            ws.send(frame)
            assert recv_type(ws, "error")["error"]["code"] == "bad_event", frame[:80]
        ws.send(json.dumps({"robot_id": "arm-1", "kind": "step_reward", "value": 1}))
        assert recv_type(ws, "ack")["transition_id"] == ids[0]
        ws.send(json.dumps({"type": "subscribe", "robot_id": "x" * 10_000}))
        assert recv_type(ws, "error")["error"]["code"] == "bad_event"
        ws.send(json.dumps({"type": "answer", "query_id": "q1", "reward": 10**400}))
        assert recv_type(ws, "error")["error"]["code"] == "bad_event"
    for frame in BAD_EVENTS[:2]:
        body = frame.encode()
        reply = _post(bridge.http_port, body, f"Content-Length: {len(body)}\r\n")
        assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert counted(bridge, "openpi_rl_bridge_errors_total", code="internal") == 0
    assert _stored(replay) == [("arm-1", "step_reward", 1.0)]


def test_a_dead_writer_fails_healthz_and_the_process_exits_non_zero(tmp_path):
    """The replay's files turn to garbage under the bridge: its writer's commit stage dies.
    The bridge must not serve on as if healthy (every press `not_stored`, /healthz "ok"):
    /healthz says which stage died, and the process exits non-zero for its supervisor."""
    with ReplayWriter(ReplayConfig(path=tmp_path / "replay")) as server:
        add_transitions(server, "arm-1", "ep-1", 1)
    proc, port, _ = _start_bridge(tmp_path)
    # Keep draining its log (the status poller logs the broken database), or the pipe fills.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    try:
        with connect(f"ws://127.0.0.1:{port}/pendant") as ws:
            ws.send(json.dumps({"type": "hello", "token": TOKEN}))
            recv_type(ws, "welcome")
            for db in (tmp_path / "replay").glob("replay.sqlite*"):  # database, WAL, index
                with open(db, "r+b") as f:  # "file is not a database"
                    f.write(b"\xff" * 8192)
            ws.send(json.dumps({"robot_id": "arm-1", "kind": "step_reward", "value": 1}))
            assert recv_type(ws, "error", timeout=30)["error"]["code"] == "not_stored"
        deadline = time.monotonic() + 10
        health = None
        while health is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
            except urllib.error.HTTPError as e:
                health = (e.code, json.loads(e.read()))
            except OSError:
                break  # already gone
            time.sleep(0.05)
        assert health is not None and health[0] == 503
        assert "replay-writer" in health[1]["failed"]
        assert proc.wait(30) != 0
    finally:
        proc.kill()
        proc.wait(30)


# ---- caps before authentication and bounded per-peer state -----------------------------------


def test_a_big_frame_before_the_hello_closes_the_connection(make_bridge):
    bridge = make_bridge(query_token="q-secret-0123456789")
    big = json.dumps({"type": "hello", "token": TOKEN, "pad": "x" * 2**20})
    for path in ("/pendant", "/query"):
        with connect(f"ws://127.0.0.1:{bridge.ws_port}{path}", max_size=None) as ws:
            ws.send(big)
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 1009, path  # message too big, before any token
    with pendant(bridge) as ws:  # after the hello, a frame a little over the cap: an error reply
        ws.send(json.dumps({"robot_id": "arm-1", "kind": "success", "pad": "x" * 100_000}))
        assert recv_type(ws, "error")["error"]["code"] == "too_large"


def test_a_pendant_has_at_most_max_pending_acks_events_in_flight(make_bridge, replay):
    add_transitions(replay, "arm-1", "ep-1", 1)
    bridge = make_bridge(max_pending_acks=4, verdict_settle_s=1.0)  # verdicts wait 1 s
    with pendant(bridge) as ws:
        for i in range(10):
            ws.send(
                json.dumps({"robot_id": "arm-1", "kind": "success", "idempotency_key": f"k{i}"})
            )
        replies = [recv_type(ws, "error") for _ in range(6)]  # at once, before any ack
        assert {r["error"]["code"] for r in replies} == {"rate_limited"}
        assert sorted(r["idempotency_key"] for r in replies) == [f"k{i}" for i in range(4, 10)]
        assert sorted(recv_type(ws, "ack")["idempotency_key"] for _ in range(4)) == [
            f"k{i}" for i in range(4)
        ]


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_share(make_bridge):
    """Behind the TLS proxy every pendant comes from the proxy's address; the share of
    max_connections one address may hold (3 of 4 here) applies to the client the proxy names,
    and only a configured proxy may name one."""
    bridge = make_bridge(max_connections=4, trusted_proxies=("127.0.0.1",))
    url = f"ws://127.0.0.1:{bridge.ws_port}/pendant"

    def logged_in(client: str, source: str = "127.0.0.1"):
        sock = socket.create_connection((("127.0.0.1", bridge.ws_port)), source_address=(source, 0))
        headers = {"X-Forwarded-For": client}
        ws = connect(url, sock=sock, additional_headers=headers).__enter__()
        ws.send(json.dumps({"type": "hello", "token": TOKEN}))
        assert recv_type(ws, "welcome")
        return ws

    with contextlib.ExitStack() as held:
        for i in range(4):  # one proxy address, four clients: all in
            held.enter_context(logged_in(f"10.0.0.{i + 1}"))
        assert len(bridge.ws_slots) == 4
    with contextlib.ExitStack() as held:  # an untrusted peer's header names nobody
        for i in range(3):
            held.enter_context(logged_in(f"10.0.1.{i + 1}", source="127.0.0.2"))
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            held.enter_context(logged_in("10.0.1.9", source="127.0.0.2"))
        assert refused.value.response.status_code == 503


def test_behind_a_trusted_proxy_http_clients_have_their_own_share(make_bridge, replay):
    add_transitions(replay, "arm-1", "ep-1", 1)
    bridge = make_bridge(max_connections=4, trusted_proxies=("127.0.0.0/8",), query_timeout_s=2)
    query = json.dumps({"observation": {"x": [1.0]}, "actions": [0.0]}).encode()

    def waiting_query(client: str) -> socket.socket:  # served (not sheddable) for 2 s
        s = socket.create_connection(("127.0.0.1", bridge.http_port), timeout=10)
        s.sendall(
            f"POST /query HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {client}\r\n"
            f"Content-Length: {len(query)}\r\n\r\n".encode()
            + query
        )
        return s

    socks = [waiting_query(f"10.0.0.{i + 1}") for i in range(4)]  # 4 > the share of 3
    for s in socks:
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply[:100]
        s.close()


def test_fsync_interval_reaches_the_replay_writer(make_bridge, replay):
    add_transitions(replay, "arm-1", "ep-1", 1)
    bridge = make_bridge(fsync_interval_s=0.0)  # every commit synced before its ack
    assert bridge.writer.config.fsync_interval_s == 0.0
    with pendant(bridge) as ws:
        ws.send(json.dumps({"robot_id": "arm-1", "kind": "step_reward", "value": 1}))
        assert recv_type(ws, "ack")["status"] == "attached"
