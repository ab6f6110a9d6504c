"""Query mode: the seed's HumanRewardWebSocket / HumanRewardHTTP, unchanged, get their reward
from an operator on a pendant (who sees a summary and a thumbnail), or the default in time."""

import base64
import json
import threading
import urllib.request

import numpy as np
import pytest
import websockets.sync.client

from openpi_rl.reward_bridge.query import png_data_url, thumbnail
from openpi_rl.rl.reward import HumanRewardHTTP, HumanRewardWebSocket, RewardError
from tests.reward_bridge.conftest import counted, pendant, recv_type


def _obs():
    rng = np.random.default_rng(0)
    return {
        "state": rng.standard_normal(4).astype(np.float32),
        "image": rng.integers(0, 255, (32, 48, 3), dtype=np.uint8),
    }


def _ask(provider) -> dict:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(r=provider.get(_obs(), np.ones((2, 3)))))
    thread.start()
    return {"thread": thread, "out": out}


@pytest.mark.parametrize("kind", ["ws", "http"])
def test_the_operator_answers_the_seed_reward_providers(make_bridge, kind):
    bridge = make_bridge()
    if kind == "ws":
        provider = HumanRewardWebSocket(f"ws://127.0.0.1:{bridge.ws_port}/query", timeout_s=10)
    else:
        provider = HumanRewardHTTP(f"http://127.0.0.1:{bridge.http_port}/query", timeout_s=10)
    with pendant(bridge) as ws:
        call = _ask(provider)
        query = recv_type(ws, "query")
        assert "state" in query["summary"] and "Actions" in query["summary"]
        assert query["thumbnail"].startswith("data:image/png;base64,")
        ws.send(json.dumps({"type": "answer", "query_id": query["query_id"], "reward": -0.5}))
        assert recv_type(ws, "query_done")["query_id"] == query["query_id"]
        call["thread"].join(10)
    assert call["out"]["r"] == -0.5
    provider.close()
    assert counted(bridge, "openpi_rl_bridge_queries_total", outcome="answered") == 1


def test_an_unanswered_query_gets_the_default_and_is_counted(make_bridge):
    bridge = make_bridge(query_timeout_s=0.3, query_default_reward=0.25)
    provider = HumanRewardWebSocket(f"ws://127.0.0.1:{bridge.ws_port}/query", timeout_s=10)
    assert provider.get(_obs(), np.ones((2, 3))) == 0.25
    assert provider.get(_obs(), np.ones((2, 3))) == 0.25  # the connection still serves
    provider.close()
    assert counted(bridge, "openpi_rl_bridge_queries_total", outcome="timeout") == 2


def test_query_token_when_configured(make_bridge):
    bridge = make_bridge(query_token="q-secret", query_timeout_s=0.1)
    base = f"http://127.0.0.1:{bridge.http_port}/query"
    with pytest.raises(Exception, match="401"):
        HumanRewardHTTP(base, timeout_s=5).get(_obs(), np.ones(2))
    # In the Authorization header, never in the URL (proxies and histories log URLs).
    with pytest.raises(Exception, match="401"):
        HumanRewardHTTP(base + "?token=q-secret", timeout_s=5).get(_obs(), np.ones(2))
    body = json.dumps({"observation": {"state": [1.0]}, "actions": [0.0]}).encode()
    req = urllib.request.Request(base, body, {"Authorization": "Bearer q-secret"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read()) == {"reward": 0.0}
    # The trainer's providers send it the same way (`openpi-rl train --reward_token`).
    http = HumanRewardHTTP(base, timeout_s=5, default_reward=0.0, token="q-secret")
    assert http.get(_obs(), np.ones(2)) == 0.0
    ws_url = f"ws://127.0.0.1:{bridge.ws_port}/query"
    ws = HumanRewardWebSocket(ws_url, timeout_s=5, default_reward=0.0, token="q-secret")
    assert ws.get(_obs(), np.ones(2)) == 0.0
    ws.close()
    with pytest.raises(RewardError, match=r"4401|401"):
        HumanRewardWebSocket(ws_url, timeout_s=5, token="wrong").get(_obs(), np.ones(2))


def test_thumbnail_is_a_valid_png_of_the_image():
    img = np.zeros((300, 200, 3), np.uint8)
    img[:, :, 0] = 255
    url = thumbnail({"cam": {"rgb": img.tolist()}, "state": [1.0, 2.0]})
    png = base64.b64decode(url.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert max(w, h) <= 128 and h > w  # downsampled, aspect kept
    assert thumbnail({"state": [1.0, 2.0]}) is None
    assert png_data_url(np.zeros((8, 8, 1), np.uint8)).startswith("data:image/png")


def test_a_query_client_may_always_send_a_hello_first(make_bridge):
    """Token or not, a client that opens every /query connection with a hello gets no reply
    to it, so its next reply is its query's."""
    bridge = make_bridge(query_timeout_s=0.1, query_default_reward=0.5)
    with websockets.sync.client.connect(f"ws://127.0.0.1:{bridge.ws_port}/query") as ws:
        ws.send(json.dumps({"type": "hello", "token": "anything"}))
        ws.send(json.dumps({"observation": {"x": [1.0]}, "actions": [0.0]}))
        assert json.loads(ws.recv(timeout=10)) == {"reward": 0.5}
