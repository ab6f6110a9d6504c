"""Capacity under hostile connections (guarantee 6): idle and slow-loris connections filling a
port's `max_connections` are shed, oldest first, for a client that sends its request at once;
503 only when every connection is being served; one peer address holds at most its share."""

import contextlib
import json
import socket
import time
import urllib.request

import pytest
import websockets.exceptions
from websockets.sync.client import connect

from openpi_rl.guards import ConnectionSlots
from tests.reward_bridge.conftest import OPERATORS, add_transitions, counted, pendant, recv_type

CAP = 6


def _open(port: int, first_bytes: bytes = b"", source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(first_bytes)
    return s


def _reply(s: socket.socket) -> bytes:
    """What the server sent before closing (b"" if it closed without a word)."""
    out = b""
    while chunk := s.recv(4096):
        out += chunk
    return out


def _wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_slots_shed_the_oldest_without_progress_and_refuse_when_all_progress():
    shed: list[str] = []
    slots = ConnectionSlots(capacity=4, per_peer=3)
    a = [slots.admit("10.0.0.1", lambda i=i: shed.append(f"a{i}")) for i in range(3)]
    b = slots.admit("10.0.0.2", lambda: shed.append("b"))
    assert None not in (*a, b) and shed == []
    a[0].sheddable = False  # its request arrived: it is being served
    # Full: a newcomer from a third host takes the oldest slot still without progress.
    assert slots.admit("10.0.0.3", lambda: shed.append("c")) is not None
    assert shed == ["a1"] and len(slots) == 4
    # 10.0.0.1 holds 2 of its 3; the cap is reached, so it sheds its own oldest idle one.
    assert slots.admit("10.0.0.1", lambda: None) is not None and shed == ["a1", "a2"]
    for s in slots:
        s.sheddable = False
    assert not slots.can_admit("10.0.0.9") and slots.admit("10.0.0.9", lambda: None) is None
    slots.release(b)
    slots.release(b)  # idempotent
    assert len(slots) == 3 and slots.can_admit("10.0.0.9")


def test_per_peer_share_keeps_slots_for_other_hosts():
    slots = ConnectionSlots(capacity=4)  # share: 3
    for _ in range(3):
        slots.admit("10.0.0.1", lambda: None).sheddable = False
    assert not slots.can_admit("10.0.0.1")  # at its share, nothing of its own to shed
    assert slots.admit("10.0.0.2", lambda: None) is not None


def test_good_post_feedback_succeeds_with_the_cap_full_of_idle_and_slow_connections(
    make_bridge, replay
):
    add_transitions(replay, "arm-1", "ep-1", 1)
    bridge = make_bridge(max_connections=CAP, handshake_timeout_s=30.0)
    port = bridge.http_port
    # The cap (each address under its share of 4): idle connections from another loopback
    # address, then slow-loris request heads from the good client's own address.
    held = [_open(port, source="127.0.0.2") for _ in range(CAP // 2)]
    slow = b"POST /feedback HTTP/1.1\r\nHost: x\r\n"
    held += [_open(port, slow) for _ in range(CAP - CAP // 2)]
    _wait_for(lambda: len(bridge.http_slots) == CAP)
    body = json.dumps({"robot_id": "arm-1", "kind": "step_reward", "value": 0.5}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/feedback",
        body,
        {"Authorization": f"Bearer {OPERATORS['ana']}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["type"] == "ack"
    # It shed the oldest idle connection, with a 503 that says why; the others still wait.
    shed = _reply(held[0])
    assert shed.startswith(b"HTTP/1.1 503") and b"retry" in shed
    assert bridge.http_slots.shed_count == 1
    assert counted(bridge, "openpi_rl_bridge_refused_connections_total", port="http") == 1
    for s in held:
        s.close()


def test_503_when_every_connection_is_being_served(make_bridge):
    bridge = make_bridge(max_connections=2, query_timeout_s=1.5)
    port = bridge.http_port
    query = json.dumps({"observation": {"x": [1.0]}, "actions": [0.0]}).encode()
    head = f"POST /query HTTP/1.1\r\nHost: x\r\nContent-Length: {len(query)}\r\n\r\n".encode()
    # Two hosts (one slot each: the per-peer share), each request waiting for an operator.
    busy = [_open(port, head + query, source=f"127.0.0.{i}") for i in (2, 3)]
    _wait_for(lambda: len(bridge.queries.pending()) == 2)
    refused = _reply(_open(port))  # answered at once, before it sends anything
    assert refused.startswith(b"HTTP/1.1 503") and b"too many connections" in refused
    for s in busy:  # served in full (the default reward at the timeout), not shed
        assert _reply(s).startswith(b"HTTP/1.1 200")


def test_pendant_without_hello_makes_way_for_a_good_pendant(make_bridge):
    bridge = make_bridge(max_connections=CAP, auth_timeout_s=30.0)
    url = f"ws://127.0.0.1:{bridge.ws_port}/pendant"
    # The cap, none past its hello: half from another address, half from the good pendant's.
    sources = ["127.0.0.2"] * (CAP // 2) + ["127.0.0.1"] * (CAP - CAP // 2)
    with contextlib.ExitStack() as held:
        silent = [
            held.enter_context(connect(url, sock=_open(bridge.ws_port, source=src)))
            for src in sources
        ]
        _wait_for(lambda: len(bridge.ws_slots) == CAP)
        with pendant(bridge) as ws:  # logged in although the cap was full
            ws.send(json.dumps({"type": "ping"}))
            assert recv_type(ws, "pong")
            # It took the slot of the oldest silent one; the rest still wait.
            assert len(bridge.ws_slots) == CAP and bridge.ws_slots.shed_count == 1
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            silent[0].recv(timeout=10)
        assert closed.value.rcvd.code == 1013  # try again later
