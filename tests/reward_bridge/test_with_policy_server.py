"""End to end with the real policy server: a robot is served through `PolicyClient`, an operator
presses on a pendant, and the feedback lands on the transitions the server logged."""

import json
import sqlite3
import threading
import time

import jax
import numpy as np

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.policy_server.server import PolicyServer, ServeOptions
from openpi_rl.replay import ReplayConfig
from openpi_rl.reward_bridge import BridgeConfig, RewardBridge
from openpi_rl.reward_bridge.frames import frame_message
from openpi_rl.rl import ActorCritic
from openpi_rl_client import PolicyClient
from tests.reward_bridge.conftest import OPERATORS, pendant, recv_type, scene


def test_feedback_lands_on_the_served_transitions(tmp_path):
    config = GaussianMLPConfig(obs_dim=6, action_dim=2, action_horizon=4)
    ac = ActorCritic(config.create(jax.random.key(0)), value_in_dim=6, value_hidden=(16,))
    server = PolicyServer(
        ac,
        ServeOptions(endpoint="tcp://127.0.0.1:*", max_batch=4),
        ReplayConfig(path=str(tmp_path / "replay"), commit_interval_s=0.02),
    )
    thread = threading.Thread(target=server.run, name="server", daemon=True)
    thread.start()
    server.wait_ready(60)
    bridge = RewardBridge(
        BridgeConfig(
            replay_dir=str(tmp_path / "replay"),
            ws_port=0,
            http_port=None,
            metrics_port=None,
            operators=OPERATORS,
            press_latency_s=0.3,
        )
    ).start()
    rng = np.random.default_rng(0)
    try:
        with (
            PolicyClient(server.endpoint, robot_id="arm-1", timeout_s=5.0) as client,
            pendant(bridge) as ws,
        ):
            obs = lambda: {"state": rng.standard_normal(6).astype(np.float32)}  # noqa: E731
            early = client.infer(obs(), episode_id="ep-1").transition_id
            time.sleep(0.5)  # this chunk plays while the operator sees it and reacts
            late = client.infer(obs(), episode_id="ep-1").transition_id
            # the press comes right after the next chunk started
            ws.send(json.dumps({"robot_id": "arm-1", "kind": "step_reward", "value": 1}))
            step = recv_type(ws, "ack")
            time.sleep(0.4)
            ws.send(json.dumps({"robot_id": "arm-1", "kind": "failure"}))
            verdict = recv_type(ws, "ack")
    finally:
        bridge.close()
        server.close()
        thread.join(30)
    assert (step["transition_id"], step["episode_id"]) == (early, "ep-1")  # t − 300 ms
    assert (verdict["transition_id"], verdict["value"]) == (late, -1.0)
    with sqlite3.connect(tmp_path / "replay" / "replay.sqlite") as conn:
        assert conn.execute("SELECT ended FROM episodes").fetchall() == [(1,)]
        assert conn.execute("SELECT sum(reward) FROM transitions").fetchone() == (0.0,)


def test_the_pendant_sees_the_camera_the_robot_sent(tmp_path):
    """A robot's camera picture, served and stored by the real policy server (Pi0-FAST's
    layout: uint8 [H, W, 3]), is the frame the bridge sends to a pendant showing that robot."""
    from openpi_rl.models.pi0_fast import Pi0FASTConfig

    config = Pi0FASTConfig(  # no prompt: one key set to compile (cam, state)
        variant="dummy", image_keys=("cam",), image_size=32, state_dim=4, prompt_len=0
    )
    ac = ActorCritic(config.create(jax.random.key(0)), value_in_dim=config.value_in_dim)
    server = PolicyServer(
        ac,
        ServeOptions(endpoint="tcp://127.0.0.1:*", max_batch=1, warm_key_sets=()),
        ReplayConfig(path=str(tmp_path / "replay"), commit_interval_s=0.02),
    )
    thread = threading.Thread(target=server.run, name="server", daemon=True)
    thread.start()
    assert server.wait_ready(120)
    bridge = RewardBridge(
        BridgeConfig(
            replay_dir=str(tmp_path / "replay"),
            ws_port=0,
            http_port=None,
            metrics_port=None,
            operators=OPERATORS,
            status_interval_s=0.1,
        )
    ).start()
    picture = scene(32, 32, shift=3)
    try:
        with (
            PolicyClient(server.endpoint, robot_id="arm-1", timeout_s=30.0) as client,
            pendant(bridge) as ws,
        ):
            obs = {"cam": picture, "state": np.ones(4, np.float32)}
            tid = client.infer(obs, episode_id="ep-1").transition_id
            ws.send(json.dumps({"type": "subscribe", "robot_id": "arm-1"}))
            frame = recv_type(ws, "frame")
            while frame["transition_id"] != tid:  # the commit may land after a first tick
                frame = recv_type(ws, "frame")
    finally:
        bridge.close()
        server.close()
        thread.join(30)
    assert list(frame["cameras"]) == ["cam"] and frame["step"] == 0
    # The very bytes the bridge makes of the picture the robot sent: it was stored unchanged.
    assert frame["cameras"]["cam"] == frame_message("x", 0, {"cam": picture}, 224)["cameras"]["cam"]
