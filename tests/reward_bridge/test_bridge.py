"""The bridge over real sockets: acknowledged means committed, resends count once, bad tokens
and bad input are refused without hurting the connection."""

import json
import sqlite3
import urllib.error
import urllib.request

import pytest
import websockets.exceptions
import websockets.sync.client

from tests.reward_bridge.conftest import OPERATORS, add_transitions, counted, pendant, recv_type


def _events(tmp_path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "replay" / "replay.sqlite") as conn:
        return conn.execute(
            "SELECT kind, value, operator, transition_id, episode_id, status, idempotency_key"
            " FROM reward_events ORDER BY id"
        ).fetchall()


def _post(bridge, body: bytes, token: str | None, path: str = "/feedback"):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        f"http://127.0.0.1:{bridge.http_port}{path}", body, headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_ack_comes_after_commit_and_a_resend_counts_once(make_bridge, replay, tmp_path):
    ids = add_transitions(replay, "arm-1", "ep-1", 3)
    bridge = make_bridge()
    event = {"robot_id": "arm-1", "kind": "success", "idempotency_key": "press-1"}
    with pendant(bridge) as ws:
        for attempt in range(2):
            ws.send(json.dumps({"type": "feedback", **event, "client_time": 1.5}))
            ack = recv_type(ws, "ack")
            assert _events(tmp_path) == [  # visible to another process when the ack arrives
                ("success", 1.0, "ana", ids[-1], "ep-1", "attached", "press-1")
            ]
            assert ack["transition_id"] == ids[-1] and ack["duplicate"] == (attempt == 1)
    assert counted(bridge, "openpi_rl_bridge_events_duplicate_total") == 1


def test_http_feedback_needs_a_token_and_acks_after_commit(make_bridge, replay, tmp_path):
    add_transitions(replay, "arm-1", "ep-1", 2)
    bridge = make_bridge()
    body = json.dumps({"robot_id": "arm-1", "kind": "step_reward", "value": -1}).encode()
    assert _post(bridge, body, None)[0] == 401
    assert _post(bridge, body, "tok-ana-0123456789x")[0] == 401
    assert _events(tmp_path) == []
    status, ack = _post(bridge, body, OPERATORS["bob"])
    assert status == 200 and ack["type"] == "ack" and ack["status"] == "attached"
    assert [(e[0], e[1], e[2]) for e in _events(tmp_path)] == [("step_reward", -1.0, "bob")]
    status, reply = _post(bridge, b"{not json", OPERATORS["bob"])
    assert status == 400 and reply["error"]["code"] == "bad_json"


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_wrong_or_missing_token_closes_the_pendant_and_stores_nothing(make_bridge, tmp_path, token):
    bridge = make_bridge()
    hello = {"type": "hello"} if token is None else {"type": "hello", "token": token}
    with websockets.sync.client.connect(f"ws://127.0.0.1:{bridge.ws_port}/pendant") as ws:
        ws.send(json.dumps(hello))
        with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
            # The bridge may have closed already (a race with this send): either way, closed.
            ws.send(json.dumps({"robot_id": "arm-1", "kind": "success"}))
            ws.recv(timeout=10)
    assert e.value.rcvd.code == 4401
    assert _events(tmp_path) == []
    assert counted(bridge, "openpi_rl_bridge_auth_failures_total", endpoint="pendant") == 1


def test_bad_input_gets_errors_and_the_connection_keeps_working(make_bridge, replay, tmp_path):
    add_transitions(replay, "arm-1", "ep-1", 2)
    bridge = make_bridge()
    bad = [
        ("{nope", "bad_json"),
        ("[1, 2]", "bad_json"),
        ('{"robot_id": "arm-1", "kind": "step_reward", "value": NaN}', "bad_json"),
        ('{"robot_id": "arm-1", "kind": "step_reward", "value": 1e999}', "bad_event"),
        ('{"robot_id": "arm-1", "kind": "dance", "value": 1}', "bad_event"),
        ('{"robot_id": "arm-1", "kind": "step_reward"}', "bad_event"),
        ('{"robot_id": "arm-1", "kind": "step_reward", "value": 1000}', "bad_event"),
        ('{"kind": "success"}', "bad_event"),
        ('{"type": "launch"}', "unknown_type"),
        (json.dumps({"robot_id": "arm-1", "kind": "success", "pad": "x" * 100_000}), "too_large"),
    ]
    with pendant(bridge) as ws:
        for frame, code in bad:
            ws.send(frame)
            assert recv_type(ws, "error")["error"]["code"] == code, frame[:60]
        ws.send(json.dumps({"robot_id": "arm-1", "kind": "step_reward", "value": 1}))
        assert recv_type(ws, "ack")["status"] == "attached"
    assert [e[0] for e in _events(tmp_path)] == ["step_reward"]
    assert counted(bridge, "openpi_rl_bridge_errors_total", code="bad_event") == 5


def test_unknown_robot_is_stored_unattached_and_reported(make_bridge, tmp_path):
    bridge = make_bridge()
    with pendant(bridge) as ws:
        ws.send(json.dumps({"robot_id": "ghost", "kind": "step_reward", "value": 1}))
        ack = recv_type(ws, "ack")
    assert ack["transition_id"] is None and ack["status"] == "unknown_robot"
    assert _events(tmp_path)[0][3:6] == (None, None, "unknown_robot")
    assert counted(bridge, "openpi_rl_bridge_events_unattached_total", status="unknown_robot") == 1


def test_pendants_get_the_live_status_from_the_replay(make_bridge, replay):
    bridge = make_bridge()
    with pendant(bridge) as ws:
        add_transitions(replay, "arm-2", "ep-7", 4)
        for _ in range(50):
            status = recv_type(ws, "status")["robots"].get("arm-2")
            if status and status["step"] == 3:
                break
        assert (status["episode_id"], status["step"], status["policy_version"]) == ("ep-7", 3, 3)
        ws.send(json.dumps({"robot_id": "arm-2", "kind": "step_reward", "value": 0.5}))
        recv_type(ws, "ack")
        for _ in range(50):
            recent = recv_type(ws, "status")["robots"]["arm-2"]["recent"]
            if recent:
                break
        assert (recent[0]["kind"], recent[0]["value"], recent[0]["operator"]) == (
            "step_reward",
            0.5,
            "ana",
        )


def test_healthz_and_page_are_served_on_both_ports(make_bridge):
    bridge = make_bridge()
    # The WebSocket port's page connects to its own origin (so it works behind a TLS proxy);
    # the HTTP port's page names the WebSocket port.
    for port, ws_port in ((bridge.ws_port, ""), (bridge.http_port, bridge.ws_port)):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert json.loads(r.read())["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            page = r.read().decode()
        assert f'name="ws-port" content="{ws_port}"' in page and "end episode" in page
