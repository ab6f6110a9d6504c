"""`openpi-rl daemon` as a real process for tests: a small service config on free loopback ports
and tmp directories, its JSON log lines (the daemon's and its children's, one stderr) parsed
as they come, and a real NOTIFY_SOCKET datagram socket standing in for systemd."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests._net import free_port

MODEL = {"obs_dim": 3, "action_dim": 2, "action_horizon": 2}
PORTS = (
    "endpoint",
    "publish",
    "serve_metrics",
    "bridge_metrics",
    "learn_metrics",
    "daemon_metrics",
)


def service_config(tmp_path: Path, ports: dict[str, int]) -> str:
    """openpi-rl.toml for a tiny service: a learner that trains on the first few chunks."""
    return f"""
replay_dir = "{tmp_path / "replay"}"
checkpoint_dir = "{tmp_path / "ckpt"}"
publish_endpoint = "tcp://127.0.0.1:{ports["publish"]}"
value_hidden = [16, 16]
log_json = true

[model]
kind = "gaussian_mlp"
obs_dim = {MODEL["obs_dim"]}
action_dim = {MODEL["action_dim"]}
action_horizon = {MODEL["action_horizon"]}
hidden = [16, 16]

[daemon]
metrics_port = {ports["daemon_metrics"]}
restart_backoff_s = 0.5
watchdog_s = {{ serve = 20.0, bridge = 20.0, learn = 300.0 }}

[serve]
metrics_port = {ports["serve_metrics"]}
openpi_ws_port = 0

[serve.serve]
endpoint = "tcp://127.0.0.1:{ports["endpoint"]}"
max_batch = 2

[bridge]
ws_port = 0
http_port = 0
metrics_port = {ports["bridge_metrics"]}

[bridge.operators]
ana = "a-test-token"

[learn]
metrics_port = {ports["learn_metrics"]}
segment_length = 8
batch_segments = 4
min_transitions = 4
settle_s = 0.0
poll_interval_s = 0.1
heartbeat_s = 0.1

[learn.ppo]
lr = 1e-3
train_iters = 2
minibatch_size = 8
"""


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaps, as an orphan under a container's init may be, is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; every line with its arrival time."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.lines: list[tuple[float, str]] = []  # (wall time, line)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.lines += [(time.time(), ln) for ln in data.decode().splitlines()]

    def times(self, line: str) -> list[float]:
        return [t for t, ln in self.lines if ln == line]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class DaemonProcess:
    def __init__(
        self,
        tmp_path: Path,
        notify: NotifySocket | None = None,
        watchdog_s: float = 2,
        edit: Callable[[str], str] = lambda text: text,
    ):
        self.ports = {name: free_port() for name in PORTS}
        self.config = tmp_path / "openpi-rl.toml"
        self.config.write_text(edit(service_config(tmp_path, self.ports)))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
        if notify is not None:
            env |= {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "openpi_rl.cli", "daemon", "--config", str(self.config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self.other: list[str] = []  # non-JSON lines (tracebacks)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                self.other.append(line)
                continue
            if isinstance(event, dict):
                self.events.append(event)

    def named(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in list(self.events)
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]

    def wait_for(self, name: str, count: int = 1, timeout_s: float = 120, **match: Any) -> list:
        deadline = time.monotonic() + timeout_s
        while len(found := self.named(name, **match)) < count:
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}: {self.tail()}"
            assert time.monotonic() < deadline, f"no {count}x {name} {match}: {self.tail()}"
            time.sleep(0.05)
        return found

    def pid_of(self, role: str) -> int:
        return self.named("daemon.child_started", role=role)[-1]["pid"]

    def tail(self, n: int = 30) -> str:
        lines = [json.dumps(e) for e in self.events[-n:]] + self.other[-n:]
        return "\n".join(lines)

    def terminate(self, timeout_s: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout_s)
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        """Test teardown: the daemon and any child it left."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for e in self.named("daemon.child_started"):
            try:  # only if that pid is still our child (its command line names our config)
                cmdline = Path(f"/proc/{e['pid']}/cmdline").read_bytes()
                if str(self.config).encode() in cmdline:
                    os.kill(e["pid"], signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
