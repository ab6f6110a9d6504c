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
from tests._net import JsonLog


def test_serve_from_a_config_file_then_sigterm_flushes_and_exits_0(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text(
        f'replay_dir = "{tmp_path / "replay"}"\nmetrics_port = 0\nopenpi_ws_port = 0\n\n'
        '[serve]\nendpoint = "tcp://127.0.0.1:*"\nmax_batch = 2\n\n'
        '[model]\nkind = "gaussian_mlp"\nobs_dim = 3\naction_dim = 2\n'
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "openpi_rl.cli", "serve", "--config", str(config)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = JsonLog(proc.stderr)
    try:
        endpoint = log.wait_for("serving")["endpoint"]  # the port it bound
        with PolicyClient(endpoint, robot_id="r", timeout_s=2.0, retries=30) as client:
            while client.health()["status"] != "ready":
                time.sleep(0.05)  # a tight loop would trip the per-robot rate limit
            ids = [client.infer({"state": np.ones(3, np.float32)}).transition_id for _ in range(7)]
        # A second server on the same replay directory is refused with a clear error.
        second = subprocess.run(
            [sys.executable, "-m", "openpi_rl.cli", "serve", "--config", str(config)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-2000:]
        assert "in use by another writer" in second.stderr
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


def test_the_replay_cap_in_the_serve_config_is_applied(tmp_path):
    import threading

    from openpi_rl import config_file
    from openpi_rl.policy_server.serve import ServeConfig, build_server
    from openpi_rl.replay import ReplayReader

    path = tmp_path / "serve.toml"
    path.write_text(
        f'replay_dir = "{tmp_path / "replay"}"\nretention_max_rows = 5\ncommit_interval_s = 0.01\n'
        '[serve]\nendpoint = "tcp://127.0.0.1:*"\nmax_batch = 1\n'
        '[model]\nkind = "gaussian_mlp"\nobs_dim = 3\naction_dim = 2\n'
    )
    server = build_server(config_file.load(ServeConfig, path))
    assert server.replay.config.retention_max_rows == 5
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert server.wait_ready(60)
    with PolicyClient(server.endpoint, robot_id="r", timeout_s=5.0) as client:
        for _ in range(12):
            client.infer({"state": np.ones(3, np.float32)})
            time.sleep(0.02)  # several commits, each followed by retention
    server.close(wait_s=30)
    thread.join(30)
    assert ReplayReader(str(tmp_path / "replay")).count() == 5
