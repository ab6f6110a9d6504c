"""`openpi-rl learn --config FILE` as a process: trains on the replay, publishes, exits 0 on
SIGTERM."""

import os
import signal
import subprocess
import sys

import numpy as np

from tests._net import JsonLog


def test_learn_cli_trains_from_config_file_and_stops_on_sigterm(tmp_path, recorder):
    recorder.episode("arm-1", "a", 6, np.random.default_rng(0))
    recorder.writer.flush()
    config = tmp_path / "learn.toml"
    config.write_text(
        f"""
replay_dir = "{tmp_path / "replay"}"
checkpoint_dir = "{tmp_path / "ckpt"}"
value_hidden = [16, 16]
segment_length = 8
batch_segments = 8
min_transitions = 1
settle_s = 0.0
poll_interval_s = 0.1
publish_endpoint = "tcp://127.0.0.1:*"
metrics_port = 0

[model]
kind = "gaussian_mlp"
obs_dim = 3
action_dim = 2
action_horizon = 2
hidden = [16, 16]

[ppo]
lr = 1e-3
train_iters = 2
minibatch_size = 16
"""
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "openpi_rl.cli", "learn", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    log = JsonLog(proc.stderr)
    try:
        assert log.wait_for("learner.published")["version"] == 1
        proc.send_signal(signal.SIGTERM)  # it waits for more data now
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log.wait_for("learner.stopped", timeout_s=10)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["0", "1"]
