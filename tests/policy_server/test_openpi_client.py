"""Robots that already use openpi-client switch with no code change: the real
`openpi_client.WebsocketClientPolicy` (PyPI 0.1.2, its own venv) against our endpoint."""

import json
import subprocess
import threading

import jax
import pytest

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.policy_server.openpi_ws import OpenPIWebSocketEndpoint
from openpi_rl.policy_server.server import PolicyServer, ServeOptions
from openpi_rl.replay import ReplayConfig, ReplayReader
from openpi_rl.rl import ActorCritic

ROBOT = """
import json, sys
import numpy as np
from openpi_client import websocket_client_policy
policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=int(sys.argv[1]), api_key=sys.argv[2] or None)
meta = policy.get_server_metadata()
shapes = []
for i in range(5):
    out = policy.infer({"observation/state": np.full(6, 0.1 * i, np.float32), "prompt": "pick up the cube"})
    shapes.append(list(out["actions"].shape))
try:
    policy.infer({"observation/state": np.zeros(3, np.float32)})
    bad = "no error"
except RuntimeError as e:
    bad = str(e)
out = policy.infer({"observation/state": np.zeros(6, np.float32)})
print(json.dumps({"meta": meta["action_horizon"], "shapes": shapes, "bad": bad, "after": list(out["actions"].shape)}))
"""


def _stack(tmp_path, **options) -> tuple[PolicyServer, OpenPIWebSocketEndpoint]:
    config = GaussianMLPConfig(obs_dim=6, action_dim=2, action_horizon=5)
    ac = ActorCritic(config.create(jax.random.key(0)), value_in_dim=6, value_hidden=(8,))
    server = PolicyServer(
        ac,
        ServeOptions(endpoint="tcp://127.0.0.1:*", **options),
        ReplayConfig(path=str(tmp_path / "replay")),
    )
    threading.Thread(target=server.run, daemon=True).start()
    server.wait_ready(60)
    ws = OpenPIWebSocketEndpoint(
        server.inproc_endpoint,
        server.metadata(),
        port=0,
        api_key="s3cret",
        key_map={"observation/state": "state"},
    ).start()
    return server, ws


@pytest.fixture
def stack(tmp_path):
    server, ws = _stack(tmp_path)
    yield server, ws
    ws.close()
    server.close(wait_s=30)


def test_real_openpi_client_gets_actions_and_its_transitions_are_stored(
    stack, tmp_path, openpi_client_python
):
    server, ws = stack
    out = subprocess.run(
        [openpi_client_python, "-c", ROBOT, str(ws.port), "s3cret"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["meta"] == 5
    assert result["shapes"] == [[5, 2]] * 5
    assert "invalid_observation" in result["bad"]  # a clear error; the connection stays usable
    assert result["after"] == [5, 2]
    server.close(wait_s=30)
    rows = ReplayReader(str(tmp_path / "replay")).transitions()
    assert len(rows) == 6 and all(r.robot_id.startswith("ws-") for r in rows)


def test_a_wrong_api_key_is_refused(stack, openpi_client_python):
    _, ws = stack
    out = subprocess.run(
        [openpi_client_python, "-c", ROBOT, str(ws.port), "wrong"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "401" in out.stderr


RECONNECTING = """
import sys
import numpy as np
from openpi_client import websocket_client_policy
for i in range(int(sys.argv[2])):  # a robot whose connection drops every step
    policy = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=int(sys.argv[1]), api_key="s3cret")
    policy.infer({"observation/state": np.zeros(6, np.float32)})
    policy._ws.close()
print("done")
"""


def test_an_openpi_client_that_reconnects_does_not_grow_the_servers_memory(
    tmp_path, openpi_client_python
):
    server, ws = _stack(tmp_path, max_robots=8)
    try:
        out = subprocess.run(
            [openpi_client_python, "-c", RECONNECTING, str(ws.port), "40"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        # Each connection is a robot id of its own ("ws-N"); 40 of them, memory for 8.
        assert server.served == 40
        assert len(server.robots) == 8 and server.robots.evicted == 32
        assert server.returns.open_episodes <= 8 and len(server.arrivals) <= 8
    finally:
        ws.close()
        server.close(wait_s=30)
