"""`openpi-rl daemon --config openpi-rl.toml`: the policy server, the reward bridge and the
learner as separate child processes, supervised the way systemd would. This module owns the
supervision loop (start order, health, restarts, reload, stop) and its metrics; one child's
spec, state and process mechanics (spawn, process groups, reaping, niceness) are children.py's.

- Each child is `python -m openpi_rl.cli ROLE --config FILE --section ROLE` (what the systemd
  units run), with stdout/stderr inherited, and its own `NOTIFY_SOCKET` owned by the daemon: a
  child says READY=1 / WATCHDOG=1 exactly as it would to systemd.
- Bridge and learner start once the server is READY (it creates the replay), as the units'
  `After=` orders them.
- Each child runs in its own session and process group, so what it starts (the server's
  restore worker) goes with it: as systemd's `KillMode=mixed`, a stop sends SIGTERM to the
  child, then SIGKILL to whatever is left of its group; a kill (watchdog, start timeout) is
  SIGKILL to the group; a child that died by itself (even of `kill -9`) has its group's
  leftovers killed before it is restarted. No orphan outlives its role, and no role outlives
  the supervisor: each child gets SIGTERM from the kernel when the daemon dies, even of
  `kill -9` (`PR_SET_PDEATHSIG`, set by the child: `openpi_rl.cli`), and stops as on a stop.
- A child that dies is restarted after a back-off that doubles with each crash in a row
  (reset once it stayed up `healthy_after_s`); one that is ready but silent past its
  watchdog, or never ready within `start_timeout_s`, is killed and restarted. Restarts are
  counted by reason.
- A child exiting with EX_CONFIG (78: its section of the file is wrong) is held down: the
  other roles go on serving; the role's error (its last STATUS=) is logged, shown in STATUS=
  and in `openpi_rl_daemon_child_config_error`, and the role is retried every
  `restart_backoff_max_s`, or at once on SIGHUP.
- SIGHUP: reload the file. A role whose inputs changed (its table, the shared settings, its
  watchdog or niceness) is restarted (SIGTERM, then started again at once); a role removed
  from `[daemon] roles` is stopped, one added is started; a held-down role is retried; the
  others are not touched. A file that does not load is logged and changes nothing.
- SIGTERM / SIGINT: SIGTERM to every child (each flushes: the server its replay queue, the
  learner finishes its update and checkpoint), SIGKILL after `stop_timeout_s`; exit 0 when
  every child exited 0.
- Under systemd (`Type=notify`): READY=1 once every child is ready, WATCHDOG=1 from this loop,
  STATUS= with each child's state.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from openpi_rl.sdnotify import Notifier
from openpi_rl.service.children import (
    PARENT_ENV,
    Child,
    ChildSpec,
    dump_stacks,
    exited,
    kill_group,
    role_inputs,
    role_specs,
    spawn,
    wait_exited,
)
from openpi_rl.service.config import EX_CONFIG, DaemonConfig, ServiceFile

# Moved to children.py; still importable from here (cli.py names PARENT_ENV).
__all__ = [
    "PARENT_ENV",
    "ChildSpec",
    "Supervisor",
    "SupervisorMetrics",
    "daemon",
    "role_inputs",
    "role_specs",
]

log = structlog.get_logger("openpi_rl.daemon")

_TICK_S = 0.1  # loop period: stop, crash and notification latency


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
            "Child restarts by reason (exit, signal, watchdog, start_timeout, reload)",
            ["role", "reason"],
            registry=r,
        )
        self.config_error = Gauge(
            "openpi_rl_daemon_child_config_error",
            "1 while the role is held down because it exited 78 (its configuration is wrong)",
            ["role"],
            registry=r,
        )
        self.reloads = Counter(
            "openpi_rl_daemon_reloads_total",
            "SIGHUP reloads of the config file by result (ok, failed)",
            ["result"],
            registry=r,
        )


class Supervisor:
    """Runs `specs` until `close()` (safe from a signal handler); `run()` returns the exit
    status."""

    def __init__(
        self,
        specs: list[ChildSpec],
        config: DaemonConfig | None = None,
        env: dict[str, str] | None = None,
        metrics: SupervisorMetrics | None = None,
        load: Callable[[], tuple[list[ChildSpec], DaemonConfig]] | None = None,
    ):
        """`load` re-reads the config file on SIGHUP (`request_reload`); None: a reload only
        retries held-down roles."""
        self.config = config or DaemonConfig()
        self.env = dict(os.environ if env is None else env)
        self.metrics = metrics or SupervisorMetrics()
        self._dir = Path(tempfile.mkdtemp(prefix="openpi-rl-daemon-"))
        self.children = [Child(s, self._dir) for s in specs]
        self.notifier = Notifier()
        # A plain flag, not an Event: close() runs in signal handlers, where Event.set can
        # deadlock on the lock the interrupted main thread holds.
        self._stopping = False
        self._run_thread: int | None = None  # run's thread while it runs: it releases on exit
        self._run_ended = threading.Event()
        self._released = False
        self._reload_requested = False
        self._load = load
        self._exit_code = 0
        self._t0 = time.monotonic()
        self._status = ""

    def close(self) -> None:
        """Stop every role (SIGTERM, SIGKILL past its stop timeout) and end `run`. Idempotent,
        from any thread: while `run` runs on another thread, it returns once `run` has returned.
        On `run`'s own thread (a signal handler) it only sets a flag `run` polls each tick."""
        self._stopping = True
        running = self._run_thread
        if running is not None:
            if running != threading.get_ident():
                self._run_ended.wait()
            return
        self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        for c in self.children:
            c.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def request_reload(self) -> None:
        """SIGHUP: reload on the next tick (a flag: safe from a signal handler)."""
        self._reload_requested = True

    def run(self) -> int:
        if self._released:
            return self._exit_code
        self._run_thread = threading.get_ident()
        self._run_ended.clear()
        log.info("daemon.start", roles=[c.spec.role for c in self.children])
        try:
            while not self._stopping:
                self._read_notifications(_TICK_S)
                now = time.monotonic()
                if self._reload_requested:
                    self._reload_requested = False
                    self._reload(now)
                for child in list(self.children):
                    self._reap(child, now)
                    self._check_health(child, now)
                    self._maybe_start(child, now)
                # A role held down by its config error must not keep the rest from being
                # ready: systemd would time the whole daemon out and take the server with it.
                if any(c.ready for c in self.children) and all(
                    c.ready or c.config_error for c in self.children
                ):
                    self.notifier.ready(status="all roles ready")
                self.notifier.watchdog()  # this loop's health: it reaps, restarts and relays
                self._report_status()
            return self._shutdown()
        finally:
            self._release()
            self._run_thread = None
            self._run_ended.set()

    # -- one tick

    def _read_notifications(self, timeout_s: float) -> None:
        socks = {c.sock: c for c in self.children}
        readable, _, _ = select.select(list(socks), [], [], timeout_s)
        for sock in readable:
            child = socks[sock]
            for line in child.drain():
                self._on_notify(child, line)

    def _on_notify(self, child: Child, line: str) -> None:
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

    def _reap(self, child: Child, now: float) -> None:
        if self._stopping or child.proc is None or not exited(child.proc):
            return  # once stopping, exits are the shutdown's to collect
        for line in child.drain():  # what it said last (STATUS= with its config error)
            self._on_notify(child, line)
        kill_group(child.proc)  # its leftovers, while its unreaped pid still holds the group
        rc, role = child.proc.wait(), child.spec.role
        reason = child.kill_reason or ("signal" if rc < 0 else "exit")
        child.proc, child.ready, child.kill_reason = None, False, None
        child.stop_deadline = None
        self.metrics.up.labels(role).set(0)
        self.metrics.ready.labels(role).set(0)
        if child.removed:
            log.info("daemon.child_stopped", role=role, rc=rc, reason="removed")
            child.close()
            self.children.remove(child)
            return
        if reason == "reload":
            child.next_start = now
            child.restarts += 1
            self.metrics.restarts.labels(role, reason).inc()
            log.info("daemon.child_exited", role=role, rc=rc, reason=reason, restart_in_s=0)
            return
        if rc == EX_CONFIG:
            # Held down, not stopping the daemon: the other roles keep serving.
            child.config_error = child.status or "exit status 78 (configuration error)"
            delay = self.config.restart_backoff_max_s
            child.next_start = now + delay
            self.metrics.config_error.labels(role).set(1)
            log.error(
                "daemon.child_config_error", role=role, rc=rc, error=child.config_error,
                retry_in_s=delay, hint="openpi-rl check --config FILE; fix it, then SIGHUP",
            )  # fmt: skip
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

    def _check_health(self, child: Child, now: float) -> None:
        """Kill a child that is stuck: ready but silent past its watchdog, or never ready."""
        if child.proc is None:
            return
        if child.stop_deadline is not None and now > child.stop_deadline:
            child.stop_deadline = None
            self._kill(child, child.kill_reason or "stop_timeout")
            return
        if child.kill_reason is not None:
            return
        wd = child.spec.watchdog_s
        if child.ready and wd is not None and now - child.last_ping > wd:
            self._kill(child, "watchdog", silent_s=round(now - child.last_ping, 2))
        elif not child.ready and now - child.started_at > self.config.start_timeout_s:
            self._kill(child, "start_timeout")

    def _kill(self, child: Child, reason: str, **info: object) -> None:
        log.error("daemon.child_killed", role=child.spec.role, reason=reason, **info)
        child.kill_reason = reason
        dump_stacks(child.proc)
        kill_group(child.proc)

    def _maybe_start(self, child: Child, now: float) -> None:
        if self._stopping or child.proc is not None or now < child.next_start:
            return
        after = next((c for c in self.children if c.spec.role == child.spec.after), None)
        waited = now - self._t0 < self.config.start_timeout_s
        if after is not None and not after.ready and child.restarts == 0 and waited:
            return  # first start waits for the server (it creates the replay)
        self._start(child, now)

    def _start(self, child: Child, now: float) -> None:
        child.drain()  # a late datagram from the previous process must not count
        child.proc = spawn(child.spec, child.notify_path, self.env)
        child.started_at, child.ready, child.status = now, False, ""
        if child.config_error is not None:
            child.config_error = None
            self.metrics.config_error.labels(child.spec.role).set(0)
        self.metrics.up.labels(child.spec.role).set(1)
        log.info(
            "daemon.child_started", role=child.spec.role, pid=child.proc.pid,
            restarts=child.restarts,
        )  # fmt: skip

    def _report_status(self) -> None:
        parts = []
        for c in self.children:
            state = "ready" if c.ready else "starting" if c.proc else "waiting"
            if c.proc is None and c.config_error:
                state = f"config error: {c.config_error}"
            elif c.proc is None and c.restarts:
                state = f"restarting ({c.restarts} restarts)"
            parts.append(f"{c.spec.role}: {state}")
        status = "; ".join(parts)
        if status != self._status:
            self._status = status
            self.notifier.status(status)

    # -- SIGHUP

    def _reload(self, now: float) -> None:
        """Apply the file as it is now: restart what changed, retry what was held down."""
        specs, config = [c.spec for c in self.children], self.config
        if self._load is not None:
            try:
                specs, config = self._load()
            except (OSError, ValueError) as e:  # keep running as configured before
                self.metrics.reloads.labels("failed").inc()
                log.error("daemon.reload_failed", error=str(e), hint="openpi-rl check")
                return
        self.metrics.reloads.labels("ok").inc()
        self.config = config
        new = {s.role: s for s in specs}
        changed, retried = [], []
        for child in list(self.children):
            spec = new.pop(child.spec.role, None)
            if spec is None:
                child.removed = True
                changed.append(child.spec.role)
                if child.proc is None:
                    child.close()
                    self.children.remove(child)
                else:
                    self._terminate(child, "removed", now)
            elif spec != child.spec:
                child.spec = spec
                changed.append(spec.role)
                if child.proc is None:
                    child.next_start = now
                else:
                    self._terminate(child, "reload", now)
            elif child.config_error is not None or child.proc is None:
                child.next_start = now  # the fix may lie outside the file (a key file, a port)
                retried.append(spec.role)
        for spec in new.values():
            self.children.append(Child(spec, self._dir))
            changed.append(spec.role)
        log.info("daemon.reloaded", changed=changed, retried=retried)

    def _terminate(self, child: Child, reason: str, now: float) -> None:
        """SIGTERM, as a stop (the child flushes); SIGKILL to its group past stop_timeout_s."""
        log.info("daemon.child_stopping", role=child.spec.role, reason=reason)
        child.kill_reason = reason
        child.stop_deadline = now + self.config.stop_timeout_s
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(signal.SIGTERM)

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
            if not wait_exited(c.proc, deadline):
                log.error("daemon.child_stop_timeout", role=c.spec.role, pid=c.proc.pid)
                dump_stacks(c.proc)
            kill_group(c.proc)  # it, if it hung; what it started, in any case
            rc = c.proc.wait()
            # As systemd: death by SIGTERM is clean (a child still starting had nothing to flush).
            clean &= rc in (0, -signal.SIGTERM)
            self.metrics.up.labels(c.spec.role).set(0)
            log.info("daemon.child_stopped", role=c.spec.role, rc=rc)
        code = self._exit_code or (0 if clean else 1)
        log.info("daemon.stopped", rc=code)
        return code


def _load_specs(path: str | Path) -> tuple[list[ChildSpec], DaemonConfig]:
    service = ServiceFile.load(path)
    return role_specs(service), service.daemon


def daemon(path: str | Path) -> int:
    """Supervise the roles of `path` until SIGTERM / SIGINT; SIGHUP reloads it."""
    try:
        service = ServiceFile.load(path)
    except (OSError, ValueError) as e:
        log.error("daemon.config_error", error=str(e))
        return EX_CONFIG
    if service.log_json is not None:  # the file decides for the daemon and its children alike
        from openpi_rl.logs import configure_logging

        os.environ["OPENPI_RL_LOG_JSON"] = "1" if service.log_json else "0"
        configure_logging()
    sup = Supervisor(role_specs(service), service.daemon, load=lambda: _load_specs(path))
    d = service.daemon
    if d.metrics_port is not None:
        httpd, _ = start_http_server(d.metrics_port, d.metrics_host, registry=sup.metrics.registry)
        log.info("daemon.metrics", host=d.metrics_host, port=httpd.server_address[1])
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: sup.close())
        # Its default action would kill the daemon, and the robots' server with it.
        signal.signal(signal.SIGHUP, lambda *_: sup.request_reload())
    return sup.run()
