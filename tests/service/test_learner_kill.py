"""The learner as an `openpi-rl learn` process next to a live server: hung (SIGSTOP) and dead
(kill -9 in the middle of an update) show in the server's health within 3 s while robots are
served the last good version without a failure; a restarted learner resumes from the newest
complete version on disk and the server follows it again."""

import json
import os
import signal
import subprocess
import sys

import pytest
from service_helpers import MODEL, Robots, ServerRig, free_port, wait_for

from openpi_rl_client import PolicyClient


def _config(tmp_path, publish_port: int, server_port: int) -> str:
    path = tmp_path / "learn.toml"
    path.write_text(
        f"""
replay_dir = "{tmp_path / "replay"}"
checkpoint_dir = "{tmp_path / "ckpt"}"
value_hidden = [16, 16]
segment_length = 8
batch_segments = 8
min_transitions = 16
settle_s = 0.0
poll_interval_s = 0.1
heartbeat_s = 0.2
max_kl = 1e9
publish_endpoint = "tcp://127.0.0.1:{publish_port}"
server_endpoints = ["tcp://127.0.0.1:{server_port}"]
metrics_port = {free_port()}

[model]
kind = "gaussian_mlp"
obs_dim = {MODEL.obs_dim}
action_dim = {MODEL.action_dim}
action_horizon = {MODEL.action_horizon}
hidden = {list(MODEL.hidden)}

[ppo]
lr = 1e-4
train_iters = 3000     # about a second per update: time to kill one in the middle
minibatch_size = 16
"""
    )
    return str(path)


def _start(config: str, log_path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENPI_RL_LOG_JSON": "1"}
    cmd = [sys.executable, "-m", "openpi_rl.cli", "learn", "--config", config]
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _complete_versions(ckpt) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


@pytest.mark.slow  # two learner processes, each compiling its update: ~40 s on 2 cores
def test_hung_and_killed_learner_while_the_server_serves_then_resume(tmp_path):
    publish_port, server_port = free_port(), free_port()
    rig = ServerRig(tmp_path, publish_port, server_port)
    config = _config(tmp_path, publish_port, server_port)
    robots = Robots(rig.endpoint, n=2, hz=200)
    health = PolicyClient(rig.endpoint, robot_id="ops", timeout_s=5.0)
    alive = lambda: health.health()["learner"]["alive"]  # noqa: E731
    learner = _start(config, tmp_path / "learn1.log")
    try:
        rig.wait_live(1, timeout_s=90)
        assert alive()

        # Hung: the process stops answering (SIGSTOP); serving goes on.
        learner.send_signal(signal.SIGSTOP)
        assert wait_for(lambda: not alive(), 3.0) < 3.0
        assert rig.metric("openpi_rl_server_learner_up") == 0
        learner.send_signal(signal.SIGCONT)
        wait_for(alive, 3.0)

        # Dead in the middle of an update.
        wait_for(lambda: rig.swapper.learner_state() == "training", 30, rig.swapper.learner_state)
        learner.send_signal(signal.SIGKILL)
        learner.wait(10)
        live_at_kill = rig.live
        on_disk = _complete_versions(tmp_path / "ckpt")
        print(f"killed while training: live {live_at_kill}, complete on disk {on_disk}")
        assert wait_for(lambda: not alive(), 3.0) < 3.0
        served = robots.requests()
        wait_for(lambda: robots.requests() > served + 50, 10, robots.requests)  # still serving
        assert rig.live == live_at_kill and robots.newest() == live_at_kill

        # Restart: it resumes from the newest complete version, and publishes past it.
        learner = _start(config, tmp_path / "learn2.log")
        rig.wait_live(on_disk[-1] + 1, timeout_s=90)
        wait_for(lambda: robots.newest() > on_disk[-1], 10)
    finally:
        robots.stop()
        health.close()
        learner.kill()
        learner.wait(10)
        rig.close()
    assert robots.failures == [], robots.failures[:3]
    robots.assert_monotone()
    lines = (tmp_path / "learn2.log").read_text().splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    resumed = [e["version"] for e in events if e.get("event") == "learner.resumed"]
    assert resumed == [on_disk[-1]], resumed  # the newest complete version, nothing lost
