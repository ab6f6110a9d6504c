"""One supervised role as a child process: what to run (`ChildSpec`, built from the file by
`role_specs`), its runtime state (`Child`: process, notify socket, restart schedule), and the
process mechanics the supervisor (supervisor.py) uses: `spawn` (own session and process group,
NOTIFY_SOCKET, the role's `[gpu]` environment, niceness, the parent's pid for
`PR_SET_PDEATHSIG`), `exited` / `wait_exited`
without reaping, `kill_group`, `dump_stacks`, `renice`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import structlog

from openpi_rl.service.config import SHARED, ServiceFile

PARENT_ENV = "OPENPI_RL_SUPERVISOR_PID"  # set in each child: it dies with this process

log = structlog.get_logger("openpi_rl.daemon")

_CLI = (sys.executable, "-m", "openpi_rl.cli")


@dataclasses.dataclass(frozen=True)
class ChildSpec:
    role: str
    argv: list[str]
    watchdog_s: float | None = None  # ready but silent this long: killed (None: no watchdog)
    after: str | None = None  # start once this role is ready
    nice: int = 0  # added to the daemon's niceness (the learner yields the CPU to the server)
    inputs: str = ""  # digest of what the role reads from the file: changed on SIGHUP, restart
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Set in the child's environment before it starts JAX (the file's `[gpu]`)."""


class Child:
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
        self.stop_deadline: float | None = None  # SIGTERM sent (reload): SIGKILL after this
        self.config_error: str | None = None  # held down: exited 78, with this reason
        self.removed = False  # no longer in the roles (reload): not restarted
        self.status = ""

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.notify_path)

    def drain(self) -> list[str]:
        """Every pending notification line."""
        lines = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return lines
            lines += data.decode(errors="replace").splitlines()


def spawn(spec: ChildSpec, notify_path: str, env: dict[str, str]) -> subprocess.Popen:
    """Start the role's process with its own NOTIFY_SOCKET (and WATCHDOG_USEC, if watched) and
    its `spec.env`, in its own session, at its niceness."""
    # The child asks the kernel for SIGTERM when this process dies (cli.py), so a
    # supervisor killed with -9 outside systemd leaves no role serving unsupervised.
    env = {**env, **spec.env, "NOTIFY_SOCKET": notify_path, PARENT_ENV: str(os.getpid())}
    env.pop("WATCHDOG_PID", None)  # systemd's, for the daemon itself
    env.pop("WATCHDOG_USEC", None)
    if spec.watchdog_s is not None:
        env["WATCHDOG_USEC"] = str(int(spec.watchdog_s * 1e6))
    # Its own session and process group: what it starts dies with it (kill_group), and a
    # terminal's signals (Ctrl-C, hang-up) reach the daemon only, which stops it in order.
    proc = subprocess.Popen(spec.argv, env=env, start_new_session=True)
    if spec.nice:
        renice(proc.pid, spec.nice)
    return proc


def exited(proc: subprocess.Popen) -> bool:
    """Whether `proc` has exited, without reaping it: until it is reaped its pid (and so its
    process group's id) cannot be reused, so `kill_group` cannot hit a stranger."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.poll() is not None
    return info is not None


def wait_exited(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait (without reaping) until `proc` exits or `deadline` (monotonic) passes."""
    while not exited(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
    return True


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the child's process group (the child, if alive, and whatever it started)."""
    if proc.returncode is not None:
        return  # reaped: its group id may name someone else's group by now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def dump_stacks(proc: subprocess.Popen, wait_s: float = 1.0) -> None:
    """SIGUSR1: the child (`openpi-rl` registers faulthandler for it) writes every thread's
    stack to its stderr, the service log, before it is killed: what it was stuck in."""
    with contextlib.suppress(OSError):
        proc.send_signal(signal.SIGUSR1)
        wait_exited(proc, time.monotonic() + wait_s)


def renice(pid: int, increment: int) -> None:
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
            inputs=role_inputs(service, role),
            env=service.role_env(role),
        )
        for role in d.roles
    ]


def role_inputs(service: ServiceFile, role: str) -> str:
    """A digest of what `role` reads from the file (its table, the shared settings, the log
    format, its `[gpu]` environment; the learner also the server's endpoint): equal digests,
    nothing to restart."""
    raw = service.raw
    inputs = {
        "table": raw.get(role),
        "shared": {k: raw[k] for k in SHARED if k in raw},
        "log_json": raw.get("log_json"),
    }
    if service.role_env(role):
        inputs["env"] = service.role_env(role)
    if role == "learn":
        inputs["serve_endpoint"] = raw.get("serve", {}).get("serve", {}).get("endpoint")
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
