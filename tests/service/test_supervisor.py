"""The supervisor's mechanics with small real child processes (plain Python, no JAX, so each
test takes seconds): restart with doubling back-off, counted; watchdog kills; SIGTERM to every
child; each child's process group dies with it (no orphan grandchild); EX_CONFIG holds that
role down while the others run, a reload retries it; READY=1 to systemd only once every child
is ready.

The children speak sd_notify with their own three lines of socket code, not ours: the daemon
must understand the protocol as systemd defines it, not just as our helper writes it."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "deploy"))
from daemon_process import alive

from openpi_rl.service.config import DaemonConfig
from openpi_rl.service.supervisor import ChildSpec, Supervisor

CHILD = r"""
import faulthandler, os, signal, socket, sys, time
mode, log = sys.argv[1], sys.argv[2]
stacks = open(log + ".stacks", "a")
faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)  # as `openpi-rl` does
def note(what):
    with open(log, "a") as f:
        f.write(f"{what} {os.getpid()} {time.monotonic()}\n")
def notify(msg):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(msg.encode(), os.environ["NOTIFY_SOCKET"])
def on_term(*_):
    note("term")
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else on_term)
note("start")
if mode == "config":
    notify("STATUS=bad.colour: unknown key")  # as `openpi-rl ROLE` says why before exiting 78
    sys.exit(78)
if mode == "spawner":  # starts a worker that ignores SIGTERM (a hung restore worker)
    import subprocess
    worker = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    with open(log, "a") as f:
        f.write(f"grandchild {worker.pid} {time.monotonic()}\n")
time.sleep(float(os.environ.get("READY_AFTER_S", "0")))
notify("READY=1")
t0 = time.monotonic()
while True:
    if mode == "crash" and time.monotonic() - t0 > 0.2:
        note("exit")
        sys.exit(3)
    if mode != "hang":
        notify("WATCHDOG=1")
    time.sleep(0.05)
"""


def spec(role: str, mode: str, log, **kw) -> ChildSpec:
    return ChildSpec(role, [sys.executable, "-c", CHILD, mode, str(log)], **kw)


def events(log) -> list[tuple[str, int, float]]:
    if not log.exists():
        return []
    return [
        (w, int(p), float(t))
        for w, p, t in (ln.split() for ln in log.read_text().split("\n") if ln)
    ]


def wait_for(cond, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


class Running:
    """Supervisor.run() on a thread; `stop()` returns its exit status."""

    def __init__(self, sup: Supervisor):
        self.sup, self.rc = sup, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.rc = self.sup.run()

    def stop(self, timeout_s: float = 20.0) -> int:
        self.sup.close()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "supervisor did not stop"
        return self.rc


def restarts(sup: Supervisor, role: str, reason: str) -> float:
    value = sup.metrics.registry.get_sample_value(
        "openpi_rl_daemon_child_restarts_total", {"role": role, "reason": reason}
    )
    return value or 0.0


def test_a_crashing_child_is_restarted_with_doubling_back_off_and_counted(tmp_path):
    log = tmp_path / "crash.log"
    config = DaemonConfig(restart_backoff_s=0.3, restart_backoff_max_s=10, healthy_after_s=60)
    run = Running(Supervisor([spec("worker", "crash", log)], config))
    try:
        wait_for(lambda: sum(e[0] == "start" for e in events(log)) >= 4, what="three restarts")
    finally:
        assert run.stop() == 0
    evs = events(log)
    exits = [t for w, _, t in evs if w == "exit"]
    starts = [t for w, _, t in evs if w == "start"]
    delays = [s - e for e, s in zip(exits, starts[1:], strict=False)][:3]
    # 0.3, 0.6, 1.2 s: each at least its back-off, at most a tick and a process start later
    # (generous: Python's start-up on a loaded 2-core machine).
    for delay, expected in zip(delays, (0.3, 0.6, 1.2), strict=True):
        assert expected <= delay < expected + 1.0, delays
    assert len({p for w, p, _ in evs if w == "start"}) == len(starts)  # a new process each time
    assert restarts(run.sup, "worker", "exit") >= 3


def test_a_ready_child_that_stops_pinging_is_killed_by_the_watchdog_and_restarted(tmp_path):
    hang, ok = tmp_path / "hang.log", tmp_path / "ok.log"
    config = DaemonConfig(restart_backoff_s=0.1)
    sup = Supervisor(
        [spec("hang", "hang", hang, watchdog_s=1.5), spec("ok", "ok", ok, watchdog_s=1.5)], config
    )
    run = Running(sup)
    try:
        wait_for(lambda: restarts(sup, "hang", "watchdog") >= 1, what="a watchdog kill")
        wait_for(lambda: sum(e[0] == "start" for e in events(hang)) >= 2, what="the restart")
    finally:
        assert run.stop() == 0
    # The child that pings on time was never touched: one start, one SIGTERM at the end.
    assert [e[0] for e in events(ok)] == ["start", "term"]
    # Before the kill, the hung child wrote its stack (the faulthandler dump) to its log.
    assert "Current thread" in (tmp_path / "hang.log.stacks").read_text()
    assert restarts(sup, "ok", "watchdog") == 0


def test_sigterm_reaches_every_child_and_a_stubborn_one_is_killed_after_the_timeout(tmp_path):
    a, b, stubborn = tmp_path / "a.log", tmp_path / "b.log", tmp_path / "s.log"
    sup = Supervisor([spec("a", "ok", a), spec("b", "ok", b)])
    run = Running(sup)
    wait_for(lambda: all(c.ready for c in sup.children), what="ready children")
    assert run.stop() == 0
    assert [e[0] for e in events(a)] == [e[0] for e in events(b)] == ["start", "term"]

    sup = Supervisor([spec("s", "stubborn", stubborn)], DaemonConfig(stop_timeout_s=0.5))
    run = Running(sup)
    wait_for(lambda: sup.children[0].ready, what="ready child")
    t = time.monotonic()
    assert run.stop() == 1  # not a clean stop: the child had to be killed
    assert 0.5 <= time.monotonic() - t < 4
    assert "Current thread" in (tmp_path / "s.log.stacks").read_text()  # why it hung, logged


def config_error(sup: Supervisor, role: str) -> float | None:
    return sup.metrics.registry.get_sample_value(
        "openpi_rl_daemon_child_config_error", {"role": role}
    )


def test_a_child_with_a_config_error_is_held_down_the_others_run_and_a_reload_retries_it(
    tmp_path,
):
    bad, ok = tmp_path / "bad.log", tmp_path / "ok.log"
    config = DaemonConfig(restart_backoff_max_s=600)
    sup = Supervisor([spec("ok", "ok", ok), spec("bad", "config", bad, after="ok")], config)
    run = Running(sup)
    try:
        wait_for(lambda: config_error(sup, "bad") == 1, what="the config error reported")
        # Held down: its next start is restart_backoff_max_s away (or a SIGHUP), not a loop.
        assert sup.children[1].next_start - time.monotonic() > 500
        assert run.thread.is_alive()  # the daemon goes on
        assert [e[0] for e in events(ok)] == ["start"]  # the other role was not touched
        assert sup.children[0].ready
        assert sup.children[1].config_error == "bad.colour: unknown key"  # its own words
        assert [e[0] for e in events(bad)] == ["start"]  # held down, not restarted in a loop
        assert restarts(sup, "bad", "exit") == 0

        sup.request_reload()  # SIGHUP: the operator fixed it (here: still broken)
        wait_for(lambda: len(events(bad)) == 2, what="a retry on reload")
        wait_for(lambda: config_error(sup, "bad") == 1 and sup.children[1].proc is None)
    finally:
        assert run.stop() == 0
    assert [e[0] for e in events(ok)] == ["start", "term"]


def grandchildren(log) -> list[int]:
    return [p for w, p, _ in events(log) if w == "grandchild"]


def test_each_child_has_its_own_process_group_and_kill_9_leaves_no_orphan(tmp_path):
    log = tmp_path / "spawner.log"
    sup = Supervisor([spec("server", "spawner", log)], DaemonConfig(restart_backoff_s=0.2))
    run = Running(sup)
    try:
        wait_for(lambda: sup.children[0].ready and grandchildren(log), what="child and worker")
        child, worker = events(log)[0][1], grandchildren(log)[0]
        assert os.getpgid(child) == child != os.getpgrp()  # its own group, led by it
        assert os.getpgid(worker) == child  # what it starts is in it
        os.kill(child, signal.SIGKILL)  # as the OOM killer would
        wait_for(lambda: not alive(worker), 10, what="the orphaned worker killed")
        wait_for(lambda: len(grandchildren(log)) == 2, what="the restart")  # and it restarts
    finally:
        assert run.stop() == 0
        for pid in grandchildren(log):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_stopping_the_daemon_takes_a_hung_grandchild_with_its_child(tmp_path):
    log = tmp_path / "spawner.log"
    sup = Supervisor([spec("server", "spawner", log)])
    run = Running(sup)
    try:
        wait_for(lambda: sup.children[0].ready and grandchildren(log), what="child and worker")
        worker = grandchildren(log)[0]
        assert run.stop() == 0  # the child exits 0 on SIGTERM; its worker ignores SIGTERM
        wait_for(lambda: not alive(worker), 5, what="the worker killed with its group")
    finally:
        for pid in grandchildren(log):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A real AF_UNIX datagram socket given to the supervisor as NOTIFY_SOCKET, as systemd does."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    yield sock
    sock.close()


def receive(sock, until, timeout_s: float = 20.0) -> list[tuple[float, str]]:
    """(monotonic time, line) of each notification until `until(lines)` holds."""
    got: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout_s
    while not until([ln for _, ln in got]):
        assert time.monotonic() < deadline, f"notifications so far: {got}"
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        got += [(time.monotonic(), ln) for ln in data.decode().splitlines()]
    return got


def test_ready_once_every_child_is_ready_in_order_then_watchdog_pings(
    tmp_path, notify_socket, monkeypatch
):
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    monkeypatch.setenv("READY_AFTER_S", "1.0")  # both children take a second to get ready
    sup = Supervisor([spec("first", "ok", first), spec("second", "ok", second, after="first")])
    run = Running(sup)
    try:
        got = receive(notify_socket, lambda ls: ls.count("WATCHDOG=1") >= 3 and "READY=1" in ls)
    finally:
        assert run.stop() == 0
    ready_t = next(t for t, ln in got if ln == "READY=1")
    (_, _, first_start), (_, _, second_start) = events(first)[0], events(second)[0]
    assert second_start >= first_start + 1.0  # started once `first` was ready
    assert ready_t >= second_start + 1.0  # READY=1 only once the last child was ready
    pings = [t for t, ln in got if ln == "WATCHDOG=1"]
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.0  # within WATCHDOG_USEC
    assert any(ln.startswith("STATUS=first: ready; second:") for _, ln in got)
