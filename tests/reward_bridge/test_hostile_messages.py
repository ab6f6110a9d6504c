"""Messages found by fuzzing (benchmarks/fuzz_atheris.py) that broke the bridge: each now gets
an error reply or its answer, and the connection keeps working (guarantee 6)."""

import json
import urllib.request

from tests.reward_bridge.conftest import counted, pendant, recv_type


def test_reward_query_with_a_ragged_observation_gets_the_default_reward(make_bridge):
    bridge = make_bridge(query_timeout_s=0.2, query_default_reward=0.25)
    body = json.dumps({"observation": {"x": [[1, 2], [3]]}, "actions": [[0.0]]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{bridge.http_port}/query", body, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:  # was 500 (ValueError in the summary)
        assert r.status == 200 and json.loads(r.read()) == {"reward": 0.25}
    assert counted(bridge, "openpi_rl_bridge_errors_total", code="internal") == 0


def test_answer_with_a_non_string_query_id_is_refused_and_the_pendant_stays(make_bridge):
    bridge = make_bridge()
    with pendant(bridge) as ws:  # was closed with 1011 (unhashable id in a dict lookup)
        ws.send(json.dumps({"type": "answer", "query_id": [1], "reward": 1}))
        assert recv_type(ws, "error")["error"]["code"] == "bad_event"
        ws.send(json.dumps({"type": "ping"}))
        assert recv_type(ws, "pong")
