"""`openpi-rl daemon --config openpi-rl.toml`: the policy server, the reward bridge and the
learner as separate child processes, supervised the way systemd would.

- Each child is `python -m openpi_rl.cli ROLE --config FILE --section ROLE` (what the systemd
  units run), with stdout/stderr inherited, and its own `NOTIFY_SOCKET` owned by the daemon: a
  child says READY=1 / WATCHDOG=1 exactly as it would to systemd.
- Bridge and learner start once the server is READY (it creates the replay), as the units'
  `After=` orders them.
- A child that dies is restarted after a back-off that doubles with each crash in a row
  (reset once it stayed up `healthy_after_s`); one that is ready but silent past its
  watchdog, or never ready within `start_timeout_s`, is killed and restarted. Restarts are
  counted by reason. A child exiting with EX_CONFIG (78: its configuration is wrong) is not
  restarted: the daemon stops and exits 78.
- SIGTERM / SIGINT: SIGTERM to every child (each flushes: the server its replay queue, the
  learner finishes its update and checkpoint), SIGKILL after `stop_timeout_s`; exit 0 when
  every child exited 0.
- Under systemd (`Type=notify`): READY=1 once every child is ready, WATCHDOG=1 from this loop,
  STATUS= with each child's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from openpi_rl.daemon.config import EX_CONFIG, DaemonConfig, ServiceFile
from openpi_rl.daemon.sdnotify import Notifier

log = structlog.get_logger("openpi_rl.daemon")

_TICK_S = 0.1  # loop period: stop, crash and notification latency
_CLI = (sys.executable, "-m", "openpi_rl.cli")


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    role: str
    argv: list[str]
    watchdog_s: float | None = None  # ready but silent this long: killed (None: no watchdog)
    after: str | None = None  # start once this role is ready
    nice: int = 0  # added to the daemon's niceness (the learner yields the CPU to the server)


class SupervisorMetrics:
    """The daemon's own /metrics (openpi_rl_daemon_<what>)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.up = Gauge("openpi_rl_daemon_child_up", "1 while the child runs", ["role"], registry=r)
        self.ready = Gauge(
            "openpi_rl_daemon_child_ready", "1 once the child said READY=1", ["role"], registry=r
        )
        self.restarts = Counter(
            "openpi_rl_daemon_child_restarts_total",
            "Child restarts by reason (exit, signal, watchdog, start_timeout)",
            ["role", "reason"],
            registry=r,
        )


class _Child:
    """Runtime state of one role: its process, its notify socket, its restart schedule."""

    def __init__(self, spec: ChildSpec, sock_dir: Path):
        self.spec = spec
        self.notify_path = str(sock_dir / f"{spec.role}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.notify_path)
        self.sock.setblocking(False)
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready = False
        self.last_ping = 0.0
        self.next_start = 0.0  # monotonic time of the next start
        self.crashes_in_row = 0
        self.restarts = 0
        self.kill_reason: str | None = None  # why the daemon killed it (watchdog, ...)
        self.status = ""

    def drain(self) -> list[str]:
        """Every pending notification line."""
        lines = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return lines
            lines += data.decode(errors="replace").splitlines()


class Supervisor:
    """Runs `specs` until `request_stop()` (safe from a signal handler); `run()` returns the
    exit status."""

    def __init__(
        self,
        specs: list[ChildSpec],
        config: DaemonConfig | None = None,
        env: dict[str, str] | None = None,
        metrics: SupervisorMetrics | None = None,
    ):
        self.config = config or DaemonConfig()
        self.env = dict(os.environ if env is None else env)
        self.metrics = metrics or SupervisorMetrics()
        self._dir = Path(tempfile.mkdtemp(prefix="openpi-rl-daemon-"))
        self.children = [_Child(s, self._dir) for s in specs]
        self.notifier = Notifier()
        # A plain flag, not an Event: request_stop runs in signal handlers, where Event.set can
        # deadlock on the lock the interrupted main thread holds.
        self._stopping = False
        self._exit_code = 0
        self._t0 = time.monotonic()
        self._status = ""

    def request_stop(self) -> None:
        self._stopping = True

    def run(self) -> int:
        log.info("daemon.start", roles=[c.spec.role for c in self.children])
        try:
            while not self._stopping:
                self._read_notifications(_TICK_S)
                now = time.monotonic()
                for child in self.children:
                    self._reap(child, now)
                    self._check_health(child, now)
                    self._maybe_start(child, now)
                if all(c.ready for c in self.children):
                    self.notifier.ready(status="all roles ready")
                self.notifier.watchdog()  # this loop's health: it reaps, restarts and relays
                self._report_status()
            return self._shutdown()
        finally:
            for c in self.children:
                c.sock.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- one tick

    def _read_notifications(self, timeout_s: float) -> None:
        socks = {c.sock: c for c in self.children}
        readable, _, _ = select.select(list(socks), [], [], timeout_s)
        for sock in readable:
            child = socks[sock]
            for line in child.drain():
                self._on_notify(child, line)

    def _on_notify(self, child: _Child, line: str) -> None:
        if child.proc is None:
            return  # from a process already reaped
        if line == "READY=1" and not child.ready:
            child.ready = True
            child.last_ping = time.monotonic()
            self.metrics.ready.labels(child.spec.role).set(1)
            log.info(
                "daemon.child_ready", role=child.spec.role, pid=child.proc.pid,
                seconds=round(time.monotonic() - child.started_at, 2),
            )  # fmt: skip
        elif line == "WATCHDOG=1":
            child.last_ping = time.monotonic()
        elif line.startswith("STATUS="):
            child.status = line.removeprefix("STATUS=")

    def _reap(self, child: _Child, now: float) -> None:
        if self._stopping or child.proc is None or child.proc.poll() is None:
            return  # once stopping, exits are the shutdown's to collect
        rc, role = child.proc.returncode, child.spec.role
        reason = child.kill_reason or ("signal" if rc < 0 else "exit")
        child.proc, child.ready, child.kill_reason = None, False, None
        self.metrics.up.labels(role).set(0)
        self.metrics.ready.labels(role).set(0)
        if rc == EX_CONFIG:
            log.error("daemon.child_config_error", role=role, rc=rc, hint="openpi-rl check")
            self._exit_code = EX_CONFIG
            self._stopping = True
            return
        if now - child.started_at >= self.config.healthy_after_s:
            child.crashes_in_row = 0
        child.crashes_in_row += 1
        delay = min(
            self.config.restart_backoff_max_s,
            self.config.restart_backoff_s * 2 ** (child.crashes_in_row - 1),
        )
        child.next_start = now + delay
        child.restarts += 1
        self.metrics.restarts.labels(role, reason).inc()
        log.warning(
            "daemon.child_exited", role=role, rc=rc, reason=reason, restart_in_s=delay,
            restarts=child.restarts, crashes_in_row=child.crashes_in_row,
        )  # fmt: skip

    def _check_health(self, child: _Child, now: float) -> None:
        """Kill a child that is stuck: ready but silent past its watchdog, or never ready."""
        if child.proc is None or child.kill_reason is not None:
            return
        wd = child.spec.watchdog_s
        if child.ready and wd is not None and now - child.last_ping > wd:
            self._kill(child, "watchdog", silent_s=round(now - child.last_ping, 2))
        elif not child.ready and now - child.started_at > self.config.start_timeout_s:
            self._kill(child, "start_timeout")

    def _kill(self, child: _Child, reason: str, **info: object) -> None:
        log.error("daemon.child_killed", role=child.spec.role, reason=reason, **info)
        child.kill_reason = reason
        _dump_stacks(child.proc)
        child.proc.kill()

    def _maybe_start(self, child: _Child, now: float) -> None:
        if self._stopping or child.proc is not None or now < child.next_start:
            return
        after = next((c for c in self.children if c.spec.role == child.spec.after), None)
        waited = now - self._t0 < self.config.start_timeout_s
        if after is not None and not after.ready and child.restarts == 0 and waited:
            return  # first start waits for the server (it creates the replay)
        self._start(child, now)

    def _start(self, child: _Child, now: float) -> None:
        child.drain()  # a late datagram from the previous process must not count
        env = {**self.env, "NOTIFY_SOCKET": child.notify_path}
        env.pop("WATCHDOG_PID", None)  # systemd's, for the daemon itself
        env.pop("WATCHDOG_USEC", None)
        if child.spec.watchdog_s is not None:
            env["WATCHDOG_USEC"] = str(int(child.spec.watchdog_s * 1e6))
        child.proc = subprocess.Popen(child.spec.argv, env=env)
        if child.spec.nice:
            _renice(child.proc.pid, child.spec.nice)
        child.started_at, child.ready, child.status = now, False, ""
        self.metrics.up.labels(child.spec.role).set(1)
        log.info(
            "daemon.child_started", role=child.spec.role, pid=child.proc.pid,
            restarts=child.restarts,
        )  # fmt: skip

    def _report_status(self) -> None:
        parts = []
        for c in self.children:
            state = "ready" if c.ready else "starting" if c.proc else "waiting"
            if c.proc is None and c.restarts:
                state = f"restarting ({c.restarts} restarts)"
            parts.append(f"{c.spec.role}: {state}")
        status = "; ".join(parts)
        if status != self._status:
            self._status = status
            self.notifier.status(status)

    # -- stop

    def _shutdown(self) -> int:
        """SIGTERM to every child, SIGKILL past stop_timeout_s; 0 when all stopped cleanly."""
        self.notifier.stopping()
        running = [c for c in self.children if c.proc is not None]
        log.info("daemon.stopping", roles=[c.spec.role for c in running])
        for c in running:
            c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout_s
        clean = True
        for c in running:
            try:
                rc = c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("daemon.child_stop_timeout", role=c.spec.role, pid=c.proc.pid)
                _dump_stacks(c.proc)
                c.proc.kill()
                rc = c.proc.wait()
            # As systemd: death by SIGTERM is clean (a child still starting had nothing to flush).
            clean &= rc in (0, -signal.SIGTERM)
            self.metrics.up.labels(c.spec.role).set(0)
            log.info("daemon.child_stopped", role=c.spec.role, rc=rc)
        code = self._exit_code or (0 if clean else 1)
        log.info("daemon.stopped", rc=code)
        return code


def _dump_stacks(proc: subprocess.Popen, wait_s: float = 1.0) -> None:
    """SIGUSR1: the child (`openpi-rl` registers faulthandler for it) writes every thread's
    stack to its stderr, the service log, before it is killed: what it was stuck in."""
    with contextlib.suppress(OSError):
        proc.send_signal(signal.SIGUSR1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)


def _renice(pid: int, increment: int) -> None:
    """Set right after exec, before the child starts threads (they inherit it)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0) + increment)
    except OSError as e:
        log.warning("daemon.renice_failed", pid=pid, increment=increment, error=str(e))


def role_specs(service: ServiceFile) -> list[ChildSpec]:
    """One child per configured role, each reading its section of the same file."""
    d = service.daemon
    return [
        ChildSpec(
            role,
            [*_CLI, role, "--config", str(service.path), "--section", role],
            watchdog_s=d.watchdog_s.get(role),
            after="serve" if role != "serve" and "serve" in d.roles else None,
            nice=d.nice.get(role, 0),
        )
        for role in d.roles
    ]


def daemon(path: str | Path) -> int:
    """Supervise the roles of `path` until SIGTERM / SIGINT."""
    try:
        service = ServiceFile.load(path)
    except (OSError, ValueError) as e:
        log.error("daemon.config_error", error=str(e))
        return EX_CONFIG
    if service.log_json is not None:  # the file decides for the daemon and its children alike
        from openpi_rl.cli import configure_logging

        os.environ["OPENPI_RL_LOG_JSON"] = "1" if service.log_json else "0"
        configure_logging()
    sup = Supervisor(role_specs(service), service.daemon)
    d = service.daemon
    if d.metrics_port is not None:
        httpd, _ = start_http_server(d.metrics_port, d.metrics_host, registry=sup.metrics.registry)
        log.info("daemon.metrics", host=d.metrics_host, port=httpd.server_address[1])
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: sup.request_stop())
    return sup.run()
