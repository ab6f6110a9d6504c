"""The supervisor's mechanics with small real child processes (plain Python, no JAX, so each
test takes seconds): restart with doubling back-off, counted; watchdog kills; SIGTERM to every
child; EX_CONFIG stops everything; READY=1 to systemd only once every child is ready.

The children speak sd_notify with their own three lines of socket code, not ours: the daemon
must understand the protocol as systemd defines it, not just as our helper writes it."""

from __future__ import annotations

import itertools
import socket
import sys
import threading
import time

import pytest

from openpi_rl.daemon.config import EX_CONFIG, DaemonConfig
from openpi_rl.daemon.supervisor import ChildSpec, Supervisor

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
    sys.exit(78)
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
        self.sup.request_stop()
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


def test_a_child_with_a_config_error_is_not_restarted_and_stops_the_daemon(tmp_path):
    bad, ok = tmp_path / "bad.log", tmp_path / "ok.log"
    sup = Supervisor([spec("ok", "ok", ok), spec("bad", "config", bad, after="ok")])
    run = Running(sup)
    run.thread.join(20)
    assert run.rc == EX_CONFIG
    assert [e[0] for e in events(bad)] == ["start"]  # never restarted
    assert [e[0] for e in events(ok)][-1] == "term"  # the others were stopped
    assert restarts(sup, "bad", "exit") == 0


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
