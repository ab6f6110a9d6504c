"""`openpi-rl serve --config FILE` as a process: it serves, logs to the replay, and a SIGTERM
stops it with exit code 0 after flushing; `openpi-rl replay stats` then counts the rows."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from openpi_rl_client import PolicyClient


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_from_a_config_file_then_sigterm_flushes_and_exits_0(tmp_path):
    port = _free_port()
    config = tmp_path / "serve.toml"
    config.write_text(
        f'replay_dir = "{tmp_path / "replay"}"\nmetrics_port = 0\nopenpi_ws_port = 0\n\n'
        f'[serve]\nendpoint = "tcp://127.0.0.1:{port}"\nmax_batch = 2\n\n'
        '[model]\nkind = "gaussian_mlp"\nobs_dim = 3\naction_dim = 2\n'
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "openpi_rl.cli", "serve", "--config", str(config)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with PolicyClient(
            f"tcp://127.0.0.1:{port}", robot_id="r", timeout_s=2.0, retries=30
        ) as client:
            while client.health()["status"] != "ready":
                time.sleep(0.05)  # a tight loop would trip the per-robot rate limit
            ids = [client.infer({"state": np.ones(3, np.float32)}).transition_id for _ in range(7)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    out = subprocess.run(
        [sys.executable, "-m", "openpi_rl.cli", "replay", "stats", str(tmp_path / "replay")],
        capture_output=True,
        text=True,
        check=True,
    )
    stats = json.loads(out.stdout)
    assert stats["rows"] == len(ids) == 7
