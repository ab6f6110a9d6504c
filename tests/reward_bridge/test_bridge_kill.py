"""`kill -9` of the bridge process right after an acknowledgement loses nothing acknowledged
(DESIGN guarantee 2): the ack is sent only after the event's commit. SIGTERM exits 0."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request

import websockets.sync.client

from tests.reward_bridge.conftest import OPERATORS, add_transitions


def _start_bridge(tmp_path) -> tuple[subprocess.Popen, int, int]:
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'replay_dir = "{tmp_path / "replay"}"\nws_port = 0\nhttp_port = 0\nmetrics_port = 0\n'
        f'press_latency_s = 0.0\n[operators]\nana = "{OPERATORS["ana"]}"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "openpi_rl.cli", "bridge", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics_port = None
    while True:  # the log says where it listens (ports were 0: any free one)
        line = proc.stderr.readline()
        assert line, "bridge exited before listening"
        if '"bridge.metrics"' in line:
            metrics_port = json.loads(line)["port"]
        if '"bridge.listening"' in line:
            return proc, json.loads(line)["ws_port"], metrics_port


def test_kill_9_right_after_an_ack_keeps_every_acked_event(tmp_path, replay):
    ids = add_transitions(replay, "arm-1", "ep-1", 3)
    proc, port, _ = _start_bridge(tmp_path)
    acked = []
    try:
        with websockets.sync.client.connect(f"ws://127.0.0.1:{port}/pendant") as ws:
            ws.send(json.dumps({"type": "hello", "token": OPERATORS["ana"]}))
            for i in range(40):  # presses in flight while the kill lands
                ws.send(json.dumps({"robot_id": "arm-1", "kind": "step_reward", "value": 1,
                                    "idempotency_key": f"k{i}"}))  # fmt: skip
            while not acked:
                msg = json.loads(ws.recv(timeout=30))
                if msg["type"] == "ack":
                    acked.append(msg["idempotency_key"])
            os.kill(proc.pid, signal.SIGKILL)  # at once: no flush, no goodbye
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(tmp_path / "replay" / "replay.sqlite") as conn:
        stored = dict(conn.execute("SELECT idempotency_key, transition_id FROM reward_events"))
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert acked[0] in stored and stored[acked[0]] == ids[-1]


def test_metrics_are_served_and_sigterm_stops_the_bridge_cleanly(tmp_path, replay):
    proc, _, metrics_port = _start_bridge(tmp_path)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "openpi_rl_bridge_connections 0.0" in text and "openpi_rl_bridge_ack_seconds" in text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
