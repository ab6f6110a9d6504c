"""`LocalCluster`: a throw-away PostgreSQL server in a temporary directory, for tests, benchmarks
and trying the PostgreSQL backend on one machine (a fleet runs its own, managed PostgreSQL).

Debian's `postgresql` package puts the server's programs in /usr/lib/postgresql/<major>/bin (not
on PATH); the newest is used. initdb and postgres refuse to run as root, so as root the cluster
runs as `nobody` (the directory is made in /tmp, which that user can reach, and given to it).
It listens on no TCP port: only on a Unix socket inside its directory, so clusters never clash
with each other or with a system one. Durability settings are off (`fsync=off`): a killed
client, or a `kill -9` of the postmaster, still loses nothing committed (the page cache outlives
the process; `synchronous_commit` stays on: COMMIT returns once the WAL is written), only a power
cut would.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self

# No fsync: a commit is in the OS once COMMIT returns (synchronous_commit stays on), so a killed
# process or postmaster loses nothing committed; only a power cut would.
FAST = ("-c", "fsync=off", "-c", "full_page_writes=off")


class ClusterUnavailable(RuntimeError):
    """No PostgreSQL server programs here (Debian: `apt-get install postgresql`)."""


def server_bin() -> Path:
    """The newest /usr/lib/postgresql/<major>/bin holding initdb and pg_ctl."""
    found = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "initdb").exists()]
    if not found:
        raise ClusterUnavailable(
            "no PostgreSQL server in /usr/lib/postgresql/*/bin: install Debian's `postgresql` "
            "package (`make debs` does)"
        )
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


class LocalCluster:
    """`start()` (initdb + pg_ctl start, ~2 s), `url(dbname)`, `create_database()`, `kill()`
    (the postmaster, -9), `restart()`, `stop()` (removes the directory). A context manager."""

    def __init__(self, options: tuple[str, ...] = FAST, user: str = "nobody"):
        self.bin = server_bin()
        self.options = options
        self.root = Path(tempfile.mkdtemp(prefix="openpi-pg-"))  # short: the socket path < 107
        self._as_root = os.geteuid() == 0
        self._user = pwd.getpwnam(user) if self._as_root else None
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self.data = self.root / "data"
        self._dbs = 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self._user is not None:
            cmd = [
                "setpriv", f"--reuid={self._user.pw_uid}", f"--regid={self._user.pw_gid}",
                "--clear-groups", "--", *cmd,
            ]  # fmt: skip
        env = {**os.environ, "HOME": str(self.root), "LC_ALL": "C.UTF-8"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=self.root)
        if check and out.returncode:
            log = self.root / "pg.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {out.stderr.strip()}\n{tail}")
        return out

    def start(self) -> Self:
        if not self.data.exists():
            self._run(
                str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
            )  # fmt: skip
        opts = " ".join(("-c listen_addresses=''", f"-k {self.root}", "-p 5432", *self.options))
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "pg.log"),
            "-w", "-t", "30", "-o", opts, "start",
        )  # fmt: skip
        return self

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL for `dbname` on this cluster (its socket directory as host)."""
        return f"postgresql://postgres@/{dbname}?host={self.root}&port=5432"

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        self._dbs += 1
        name = name or f"replay_{self._dbs}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def postmaster_pid(self) -> int | None:
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(pid_file.read_text().split()[0])
        return None

    def kill(self) -> None:
        """`kill -9` the postmaster (its backends exit once they notice; a restart recovers)."""
        pid = self.postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.02)

    def restart(self) -> None:
        """Start again after `kill()` (crash recovery replays the WAL) or `stop(remove=False)`."""
        # A killed postmaster's backends may still hold the shared memory for a moment.
        deadline = time.monotonic() + 15
        while True:
            try:
                self.start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, remove: bool = True) -> None:
        if self.data.exists():
            self._run(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop",
                check=False,
            )  # fmt: skip
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our child only if we started it directly; pg_ctl daemonizes) counts as gone.
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False
