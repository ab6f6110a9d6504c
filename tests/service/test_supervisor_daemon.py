"""`openpi-rl daemon --config openpi-rl.toml` with the three real roles, under a real
NOTIFY_SOCKET as systemd gives it: every child reports READY=1 (server after warm-up, bridge
once listening, learner once version 0 is saved) and the daemon then says READY=1 and keeps
sending WATCHDOG=1; `kill -9` of a child gets it restarted after the back-off and counted;
SIGTERM during a learner update: every child gets SIGTERM, the server's replay is flushed,
the learner finishes the update and writes that version, and everything exits 0."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "deploy"))
from daemon_process import MODEL, PORTS, DaemonProcess, NotifySocket, alive, service_config

from openpi_rl.models import GaussianMLPConfig
from openpi_rl.models.choice import build_actor_critic
from openpi_rl.weights import LatestVersion, VersionCheckpoints
from openpi_rl.weights.versions import restore_version
from openpi_rl_client import PolicyClient

ROLES = ("serve", "bridge", "learn")


def wall(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def daemon_metric(port: int, line_start: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_daemon_supervises_the_three_roles_and_stops_them_cleanly(tmp_path, notify):
    d = DaemonProcess(tmp_path, notify, watchdog_s=3.0)
    try:
        # -- start: server first (it creates the replay), then bridge and learner
        # -- start: server first (it creates the replay), then bridge and learner
        first_ready = {r: d.wait_for("daemon.child_ready", role=r)[0] for r in ("serve", "bridge")}
        started = {r: d.wait_for("daemon.child_started", role=r)[0] for r in ROLES}
        assert wall(started["bridge"]) >= wall(first_ready["serve"])
        assert wall(started["learn"]) >= wall(first_ready["serve"])
        pids = {r: started[r]["pid"] for r in ROLES}
        assert len(set(pids.values())) == 3
        assert all(parent_of(p) == d.proc.pid for p in pids.values())  # separate child processes

        # -- kill -9 of a child (while the learner still starts): restarted after the back-off
        os.kill(pids["bridge"], signal.SIGKILL)
        exited = d.wait_for("daemon.child_exited", role="bridge")[0]
        assert exited["rc"] == -9 and exited["reason"] == "signal"
        assert exited["restart_in_s"] == 0.5 and exited["restarts"] == 1
        again = d.wait_for("daemon.child_started", 2, role="bridge")[1]
        assert again["pid"] != pids["bridge"] and wall(again) - wall(exited) >= 0.5
        d.wait_for("daemon.child_ready", 2, role="bridge")
        first_ready["learn"] = d.wait_for("daemon.child_ready", role="learn")[0]
        restarts = daemon_metric(
            d.ports["daemon_metrics"],
            'openpi_rl_daemon_child_restarts_total{reason="signal",role="bridge"}',
        )
        assert restarts == 1.0

        # -- READY=1 to systemd once all three were ready
        deadline = time.monotonic() + 10
        while not notify.times("READY=1"):
            assert time.monotonic() < deadline, notify.lines
            time.sleep(0.05)
        ready_t = notify.times("READY=1")[0]
        assert all(wall(e) <= ready_t + 0.01 for e in first_ready.values())

        # -- robots: one finished episode of 6 chunks for the learner
        watch = LatestVersion(f"tcp://127.0.0.1:{d.ports['publish']}")
        endpoint = f"tcp://127.0.0.1:{d.ports['endpoint']}"
        with PolicyClient(endpoint, robot_id="arm-1", timeout_s=5.0) as client:
            obs = {"state": np.ones(MODEL["obs_dim"], np.float32)}
            ids = [client.infer(obs).transition_id for _ in range(6)]
            client.report(ids[-1], reward=1.0, done=True)

        # -- SIGTERM while the learner is in its first update (compiling, then training)
        deadline = time.monotonic() + 120
        while (watch.last_heartbeat or {}).get("state") != "training":
            assert time.monotonic() < deadline, watch.last_heartbeat
            watch.poll(0.05)
        watch.close()
        assert d.terminate() == 0, d.tail()
    finally:
        d.kill()

    stopped = {e["role"]: e["rc"] for e in d.named("daemon.child_stopped")}
    assert stopped == dict.fromkeys(ROLES, 0), stopped  # each handled SIGTERM itself
    assert "STOPPING=1" in [ln for _, ln in notify.lines]
    pings = notify.times("WATCHDOG=1")
    assert len(pings) >= 3 and max(b - a for a, b in itertools.pairwise(pings)) < 3.0

    # The server flushed: every served chunk is in the replay.
    stats = subprocess.run(
        [sys.executable, "-m", "openpi_rl.cli", "replay", "stats", str(tmp_path / "replay")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(stats.stdout)["rows"] == len(ids) == 6

    # The learner finished the update it was in and wrote it: version 1, complete, restorable.
    learner = d.named("learner.stopped")[0]
    assert wall(d.named("learner.published")[0]) > wall(d.named("daemon.stopping")[0])  # in flight
    assert learner["version"] == 1 and learner["transitions_trained"] == 6
    checkpoints = VersionCheckpoints(tmp_path / "ckpt")
    try:
        assert checkpoints.versions() == [0, 1]
    finally:
        checkpoints.close()
    model = GaussianMLPConfig(**MODEL, hidden=(16, 16))
    restore_version(tmp_path / "ckpt" / "1", build_actor_critic(model, (16, 16), 0))


def test_a_role_with_a_wrong_section_exits_78_naming_the_key(tmp_path):
    """EX_CONFIG from the real role CLI, as the daemon and the units run it: the daemon holds
    such a child down (tests/service/test_supervisor.py), and systemd does not restart it
    (RestartPreventExitStatus=78)."""
    config = tmp_path / "openpi-rl.toml"
    config.write_text(
        service_config(tmp_path, dict.fromkeys(PORTS, 0)).replace(
            "[bridge]\n", "[bridge]\ncolour = 1\n"
        )
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "openpi_rl.cli",
            "bridge",
            "--config",
            str(config),
            "--section",
            "bridge",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 78, out.stderr
    assert "bridge: unknown key(s) ['colour']" in out.stderr


def only_roles(*roles: str):
    def edit(text: str) -> str:
        return text.replace("[daemon]\n", f"[daemon]\nroles = {list(roles)}\n")

    return edit


def test_sighup_reloads_the_file_and_restarts_only_a_role_whose_config_changed(tmp_path):
    d = DaemonProcess(tmp_path, edit=only_roles("bridge"))
    try:
        d.wait_for("daemon.child_ready", role="bridge")
        bridge = d.pid_of("bridge")
        d.proc.send_signal(signal.SIGHUP)  # nothing changed: nothing restarts
        assert d.wait_for("daemon.reloaded")[0]["changed"] == []
        # A restart would have been asked for (child_stopping) before `reloaded` was logged.
        assert d.named("daemon.child_stopping") == []
        assert d.proc.poll() is None and d.pid_of("bridge") == bridge

        d.config.write_text(
            d.config.read_text().replace("[bridge]\n", "[bridge]\nrobots = ['arm-1']\n")
        )
        d.proc.send_signal(signal.SIGHUP)
        assert d.wait_for("daemon.reloaded", 2)[1]["changed"] == ["bridge"]
        d.wait_for("daemon.child_ready", 2, role="bridge")
        assert d.pid_of("bridge") != bridge

        d.config.write_text("this is [not toml")  # a broken file changes nothing
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("daemon.reload_failed")  # logged instead of any restart
        assert len(d.named("daemon.child_stopping")) == 1  # the one of the changed bridge
        assert d.proc.poll() is None and len(d.named("daemon.child_started")) == 2
        assert d.terminate() == 0, d.tail()
    finally:
        d.kill()


def test_a_bad_bridge_section_leaves_the_server_serving_and_is_reported(tmp_path):
    d = DaemonProcess(
        tmp_path,
        edit=lambda t: only_roles("serve", "bridge")(
            t.replace("[bridge]\n", "[bridge]\ncolour = 1\n")
        ),
    )
    try:
        error = d.wait_for("daemon.child_config_error", role="bridge")[0]
        assert "bridge: unknown key(s) ['colour']" in error["error"]
        d.wait_for("daemon.child_ready", role="serve")
        endpoint = f"tcp://127.0.0.1:{d.ports['endpoint']}"
        with PolicyClient(endpoint, robot_id="arm-1", timeout_s=5.0) as client:
            assert client.health()["status"] == "ready"
            client.infer({"state": np.ones(MODEL["obs_dim"], np.float32)})
        metric = 'openpi_rl_daemon_child_config_error{role="bridge"}'
        assert daemon_metric(d.ports["daemon_metrics"], metric) == 1.0
        assert d.proc.poll() is None and len(d.named("daemon.child_started", role="bridge")) == 1
        check = subprocess.run(
            [sys.executable, "-m", "openpi_rl.cli", "check", "--config", str(d.config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "bridge: unknown key(s) ['colour']" in check.stdout, check.stdout

        d.config.write_text(d.config.read_text().replace("colour = 1\n", ""))  # fixed
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("daemon.child_ready", role="bridge")
        assert daemon_metric(d.ports["daemon_metrics"], metric) == 0.0
        assert len(d.named("daemon.child_started", role="serve")) == 1  # never touched
        assert d.terminate() == 0, d.tail()
    finally:
        d.kill()


def test_roles_stop_cleanly_when_the_daemon_is_killed_9(tmp_path):
    """Outside systemd no cgroup takes the children with a daemon killed by -9: each asked the
    kernel for SIGTERM on its parent's death, so none serves on unsupervised (a restarted daemon
    would find its replay directory held by the orphaned server)."""
    d = DaemonProcess(tmp_path)
    try:
        for role in ROLES:
            d.wait_for("daemon.child_ready", role=role)
        pids = {r: d.pid_of(r) for r in ROLES}
        d.proc.kill()  # kill -9 of the supervisor
        d.proc.wait(10)
        deadline = time.monotonic() + 60
        while any(map(alive, pids.values())) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, pids.values())), {r: alive(p) for r, p in pids.items()}
        # The server stopped as on any SIGTERM: its replay flushed and closed (lock released).
        d.wait_for("stopped", timeout_s=10)
        d.wait_for("replay.close", timeout_s=10)
    finally:
        d.kill()
