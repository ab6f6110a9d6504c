"""sd_notify as systemd defines it, on real AF_UNIX datagram sockets: READY=1 and WATCHDOG=1
reach a path or an abstract socket; WATCHDOG_PID for another process turns pings off; and a
real policy server's pings come from its serving loop: READY=1 only after warm-up, and no
WATCHDOG=1 while the loop is stuck, though the process and its other threads run on."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest

from openpi_rl import sdnotify
from openpi_rl.models import GaussianMLPConfig
from openpi_rl.policy_server.serve import ServeConfig, build_server
from openpi_rl.policy_server.server import ServeOptions
from openpi_rl_client import PolicyClient


def listen(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_reaches_a_path_and_an_abstract_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with listen(path) as sock:
        assert sdnotify.notify("READY=1", "STATUS=up", environ={"NOTIFY_SOCKET": path})
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    name = f"openpi-rl-test-{os.getpid()}"
    with listen("\0" + name) as sock:
        assert sdnotify.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"WATCHDOG=1"
    assert not sdnotify.notify("READY=1", environ={})  # no supervisor: nothing sent, no error
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "none")})


def test_watchdog_interval_follows_watchdog_usec_and_pid():
    assert sdnotify.watchdog_interval_s({"WATCHDOG_USEC": "2500000"}) == 2.5
    mine = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert sdnotify.watchdog_interval_s(mine) == 1.0
    assert sdnotify.watchdog_interval_s({**mine, "WATCHDOG_PID": "1"}) is None  # not for us
    assert sdnotify.watchdog_interval_s({}) is None


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    sock = listen(path)
    sock.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "600000")  # probe every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def drain(sock: socket.socket, seconds: float) -> list[str]:
    lines, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            lines += sock.recv(4096).decode().splitlines()
    return lines


def test_a_stuck_serving_loop_stops_the_watchdog_pings(notify_socket):
    config = ServeConfig(
        model=GaussianMLPConfig(obs_dim=3, action_dim=2),
        serve=ServeOptions(endpoint="tcp://127.0.0.1:*", max_batch=2),
        replay_dir=None,
        metrics_port=None,
        openpi_ws_port=None,
    )
    server = build_server(config)
    release = threading.Event()
    metadata = server.metadata

    def hung_metadata() -> dict:  # the fault: the loop blocks inside a request (a hung call)
        release.wait()
        return metadata()

    server.metadata = hung_metadata  # this server's public method, replaced

    def ask_metadata() -> None:
        with PolicyClient(server.endpoint, robot_id="m", timeout_s=30.0, retries=0) as client:
            client.metadata()

    watchdog = sdnotify.HealthWatchdog(sdnotify.zmq_health(server.inproc_endpoint)).start()
    loop = threading.Thread(target=server.run, daemon=True)
    loop.start()
    try:
        lines, deadline = [], time.monotonic() + 60
        while "READY=1" not in lines:
            assert time.monotonic() < deadline, lines
            lines += drain(notify_socket, 0.05)
        assert server.ready  # READY=1 came only once every batch size compiled
        lines += drain(notify_socket, 1.0)
        assert lines.count("READY=1") == 1 and lines.count("WATCHDOG=1") >= 2

        asking = threading.Thread(target=ask_metadata, daemon=True)
        asking.start()
        drain(notify_socket, 0.3)  # a ping in flight when it got stuck
        assert "WATCHDOG=1" not in drain(notify_socket, 1.2)  # twice the watchdog: silent
        release.set()
        assert "WATCHDOG=1" in drain(notify_socket, 1.0)  # answers again: pings again
        asking.join(10)
        assert not asking.is_alive()  # the hung request was answered too
    finally:
        release.set()
        watchdog.close()
        server.close(wait_s=10)
    assert drain(notify_socket, 0.2)[-1:] == ["STOPPING=1"]
