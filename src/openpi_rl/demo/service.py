"""`openpi-rl daemon` as a child process of the demo: started, awaited, stopped with SIGTERM.

Its log (the daemon's and its children's JSON lines, one stream) goes to a file, so the live
table owns the terminal; the demo reads nothing from it but shows its path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from openpi_rl.demo.config import DemoService
from openpi_rl_client import PolicyClient, protocol


class DaemonProcess:
    """`DaemonProcess(config_path, log_path).start()`; `wait_ready()`; `close()` returns its
    exit status (0: every role flushed and exited cleanly)."""

    def __init__(self, config_path: Path, log_path: Path):
        self.config_path, self.log_path = Path(config_path), Path(log_path)
        self.service = DemoService.load(self.config_path)
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> DaemonProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in close)
        cmd = [sys.executable, "-m", "openpi_rl.cli", "daemon", "--config", str(self.config_path)]
        env = {**os.environ, "OPENPI_RL_LOG_JSON": "1"}
        env.pop("NOTIFY_SOCKET", None)  # the demo is not a systemd unit
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> dict:
        """Until the server answers `ready`, hears the learner's heartbeat, and the bridge
        answers /healthz. Returns the server's health reply. Raises RuntimeError when the
        daemon exits first, TimeoutError past `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        s = self.service
        healthz = s.pendant_ws.replace("ws://", "http://").replace("/pendant", "/healthz")
        with PolicyClient(s.endpoint, robot_id="demo-health", timeout_s=0.5, retries=0) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"openpi-rl daemon exited with {self.proc.returncode}; see {self.log_path}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"service not ready after {timeout_s} s; see {self.log_path}"
                    )
                try:
                    health = c.health()
                    if health.get("status") == "ready" and health["learner"]["alive"]:
                        with urllib.request.urlopen(healthz, timeout=1) as r:
                            if json.load(r).get("status") == "ok":
                                return health
                except (TimeoutError, OSError, KeyError, TypeError, protocol.ProtocolError):
                    pass
                time.sleep(0.2)

    def close(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, as systemd would; SIGKILL past `timeout_s`. Idempotent; the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def problems(self, limit: int = 5) -> list[str]:
        """The log's last errors and unclean child exits: why the daemon exited non-zero."""
        bad = []
        with open(self.log_path, errors="replace") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                name = str(event.get("event", ""))
                unclean = name == "daemon.child_stopped" and event.get("rc") not in (0, -15)
                if unclean or event.get("level") in ("error", "critical"):
                    bad.append(", ".join(f"{k}={v}" for k, v in event.items() if k != "level"))
        return bad[-limit:]
