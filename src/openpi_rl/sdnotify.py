"""sd_notify(3) in a few lines: tell systemd (or `openpi-rl daemon`, which speaks the same
protocol to its children) that a process is ready and still healthy.

The protocol: newline-separated `KEY=VALUE` lines in one datagram to the AF_UNIX socket named
by `$NOTIFY_SOCKET` (a leading `@` means Linux's abstract namespace). `$WATCHDOG_USEC` (and
optionally `$WATCHDOG_PID`) say that the supervisor expects `WATCHDOG=1` at least that often.

Pings must come from the role's own serving loop, never from a timer that runs on while the
loop is stuck: the server and the bridge are probed by a real request through their loop
(`HealthWatchdog`), the learner pings between its steps (`Notifier.watchdog`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable

import structlog

log = structlog.get_logger("openpi_rl.sdnotify")


def notify(*lines: str, environ: dict[str, str] | None = None) -> bool:
    """Send `lines` (e.g. "READY=1") as one datagram to $NOTIFY_SOCKET. False (and nothing
    sent) when the variable is unset, i.e. no supervisor listens; errors are logged, not raised:
    a notification must never take a service down."""
    addr = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(lines).encode(), addr)
    except OSError as e:
        log.warning("sdnotify.failed", socket=addr, error=str(e))
        return False
    return True


def config_error(role: str, message: str) -> int:
    """A role's configuration is wrong: say so on stderr and to the supervisor (STATUS=, which
    the daemon shows for a held-down role); returns EX_CONFIG (78, sysexits), the exit status
    neither the daemon nor systemd restarts."""
    print(f"openpi-rl {role}: {message}", file=sys.stderr)
    notify("STATUS=" + message.replace("\n", " "))
    return os.EX_CONFIG


def watchdog_interval_s(environ: dict[str, str] | None = None) -> float | None:
    """The supervisor's watchdog timeout (sd_watchdog_enabled), or None when it set none or set
    it for another process (`$WATCHDOG_PID` is not ours)."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6


class Notifier:
    """READY=1 once; WATCHDOG=1 at most every half timeout (systemd's advice), so calling
    `watchdog()` from a fast loop costs a clock read."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.interval_s = watchdog_interval_s()
        self.is_ready = False
        self._last_ping = 0.0

    def ready(self, status: str | None = None) -> None:
        if not self.is_ready:
            self.is_ready = True
            notify("READY=1", *([f"STATUS={status}"] if status else []))
            self._last_ping = time.monotonic()

    def watchdog(self) -> None:
        if self.interval_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.interval_s / 2:
            notify("WATCHDOG=1")
            self._last_ping = now

    def status(self, text: str) -> None:
        notify(f"STATUS={text}")

    def stopping(self) -> None:
        notify("STOPPING=1")


class HealthWatchdog:
    """A thread that asks the role's serving loop for its health with a real request and only
    then notifies: READY=1 the first time `probe()` returns True, WATCHDOG=1 after every answer.
    A stuck loop answers nothing (the probe times out or blocks), so the pings stop and the
    supervisor restarts the process. Does nothing when no supervisor listens."""

    def __init__(self, probe: Callable[[], bool], notifier: Notifier | None = None):
        self.probe = probe
        self.notifier = notifier or Notifier()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HealthWatchdog:
        if self.notifier.enabled:
            self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
            self._thread.start()
        return self

    def _period_s(self) -> float:
        # Until ready: poll often, so READY=1 follows warm-up closely. Then a third of the
        # watchdog timeout leaves two chances before it expires.
        if not self.notifier.is_ready or self.notifier.interval_s is None:
            return 0.1
        return min(1.0, self.notifier.interval_s / 3)

    def _run(self) -> None:
        while not self._stop.wait(self._period_s()):
            if self.notifier.is_ready and self.notifier.interval_s is None:
                return  # ready, and nobody asked for pings
            try:
                ready = self.probe()
            except Exception:  # no answer: the loop is stuck or not up yet; say nothing
                continue
            if self._stop.is_set():
                return
            if ready:
                self.notifier.ready()
            self.notifier.watchdog()

    def close(self) -> None:
        """Stop probing and tell the supervisor we are stopping. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.notifier.enabled:
            self.notifier.stopping()


def zmq_health(endpoint: str, timeout_s: float = 1.0) -> Callable[[], bool]:
    """Probe for the policy server: a `health` request through its ROUTER loop (the in-process
    endpoint shares the server's ZMQ context). True once it has warmed up."""
    import zmq

    from openpi_rl_client import PolicyClient

    def probe() -> bool:
        with PolicyClient(
            endpoint, robot_id="sd-watchdog", timeout_s=timeout_s, retries=0,
            context=zmq.Context.instance(),
        ) as client:  # fmt: skip
            return client.health()["status"] == "ready"

    return probe


def http_health(url_of: Callable[[], str], timeout_s: float = 1.0) -> Callable[[], bool]:
    """Probe for the reward bridge: GET /healthz through its event loop. `url_of` is called each
    time, as the port is known only once the bridge listens (port 0)."""

    def probe() -> bool:
        with contextlib.closing(urllib.request.urlopen(url_of(), timeout=timeout_s)) as r:
            return r.status == 200

    return probe
