"""Checkpoint restores off the server's process: a long-lived, low-priority worker process
restores a version with orbax and hands its weights back as raw bytes, one leaf per message.

Measured in the server's process (4 robots x 50 Hz, 2 cores), an orbax restore holds the GIL
in Python, asyncio and tensorstore threads for ~37 ms per version and stalls a 1 ms sleeper
thread by up to ~6 ms; everything else a swap does costs ~4 ms. In the worker, the server's
share of a swap is reading the bytes, `jax.device_put` and one check call.

    swapper thread --(restore, path, delta_only)--> worker: orbax restore into numpy (nice'd,
                                                    CPU-only JAX)
                   <--(ok, [(index, shape, dtype)])-- then one bytes message per leaf
                   <--(error, is_value_error, message)--

The worker is spawned once (`python -m openpi_rl.policy_server.restore_worker FD`) on one end of
a socket pair and exits when the pair closes (the server went away). A worker that died is
restarted at the next restore; one that dies or hangs during a restore is killed, restarted,
and that restore raises `RestoreError`.

A LoRA delta version (weights/versions.py) restores with its base's arrays, or, `delta_only`,
as its own arrays alone (LoRA + value head: the server's live weights already sit on its base),
so only those cross the socket.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger("openpi_rl.policy_server.restore_worker")


class RestoreError(RuntimeError):
    """The worker could not restore the version (missing, partial or unreadable checkpoint),
    died, or took longer than its timeout."""


class RestoreWorker:
    """`RestoreWorker(abstract).restore(path) -> leaves`: the weights of the version at `path`
    as numpy arrays in `jax.tree.leaves(abstract)` order. `abstract` is the served state's
    tree with `jax.ShapeDtypeStruct` leaves (what orbax restores into). Thread-safe: one
    restore at a time."""

    def __init__(self, abstract: Any, nice: int = 10, timeout_s: float = 120.0):
        self._abstract = pickle.dumps(abstract)
        self.nice, self.timeout_s = nice, timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self.starts = 0
        with self._lock:
            self._start()  # now: its imports overlap the server's warm-up

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # never take an accelerator's memory
        with ours, theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), str(self.nice)],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
            self._conn = Connection(ours.detach())
        self._conn.send_bytes(self._abstract)
        self.starts += 1

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            self._proc.wait(10)
            self._proc = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def restore(self, path: str | Path) -> list[np.ndarray]:
        """Every leaf of the version at `path` (a delta's over its base's). Raises ValueError
        when orbax finds the checkpoint's structure differs from `abstract`'s, RestoreError for
        anything else that went wrong."""
        changed = self.restore_changed(path)
        return [changed[i] for i in sorted(changed)]

    def restore_changed(self, path: str | Path, delta_only: bool = False) -> dict[int, np.ndarray]:
        """{leaf index: array} of the version at `path`: every leaf, or with `delta_only` a
        delta version's own leaves alone (a full version still gives every leaf). Raises as
        `restore`; CorruptVersion's message when a delta's base is missing or changed."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                log.warning("restore_worker.restart", exit_code=self._proc and self._proc.poll())
                self._stop()
                self._start()
            try:
                head, leaves = self._exchange(str(path), delta_only)
            except (OSError, EOFError, TimeoutError) as e:  # died, hung, or a broken pipe
                log.warning("restore_worker.failed", path=str(path), error=repr(e))
                self._stop()
                self._start()
                raise RestoreError(f"restore worker failed: {e!r}") from e
        if head[0] == "error":  # answered: the worker itself is fine
            _, value_error, message = head
            raise (ValueError if value_error else RestoreError)(message)
        return leaves

    def _exchange(self, path: str, delta_only: bool) -> tuple[tuple, dict[int, np.ndarray]]:
        conn = self._conn
        conn.send(("restore", path, delta_only))
        if not conn.poll(self.timeout_s):
            raise TimeoutError(f"no answer in {self.timeout_s} s")
        head = conn.recv()
        if head[0] != "ok":
            return head, {}
        leaves = {
            i: np.frombuffer(conn.recv_bytes(), dtype).reshape(shape) for i, shape, dtype in head[1]
        }
        return head, leaves

    def close(self) -> None:
        """Idempotent."""
        with self._lock:
            self._stop()


def _restore_leaves(path: str, target: Any, delta_only: bool) -> dict[int, np.ndarray]:
    from openpi_rl.weights.versions import restore_leaves

    changed = restore_leaves(path, target, base=not delta_only)
    return {i: np.ascontiguousarray(x) for i, x in sorted(changed.items())}


def _serve(conn: Connection) -> None:
    """The worker's loop: one restore per request, until the server closes its end."""
    import jax

    abstract = pickle.loads(conn.recv_bytes())
    # numpy targets: orbax reads into host arrays, no JAX device arrays to copy out of.
    target = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), abstract)
    while True:
        try:
            _, path, delta_only = conn.recv()
        except EOFError:
            return
        try:
            leaves = _restore_leaves(path, target, delta_only)
        except Exception as e:  # answered: the server fails this version and goes on
            conn.send(("error", isinstance(e, ValueError), f"{type(e).__name__}: {e}"))
            continue
        # dtype objects: bfloat16 too
        conn.send(("ok", [(i, x.shape, x.dtype) for i, x in leaves.items()]))
        for x in leaves.values():
            conn.send_bytes(memoryview(x).cast("B"))


def main(argv: list[str]) -> None:
    fd, nice = int(argv[0]), int(argv[1])
    if nice:  # before the restore threads start: they inherit it
        with contextlib.suppress(OSError):
            os.nice(nice)
        # SCHED_IDLE: a woken server thread preempts this process at once. A nice'd process
        # still holds a core for a scheduler slice (measured: ~1.4 ms stalls of a 1 ms sleeper).
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    _serve(Connection(fd))


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["RestoreError", "RestoreWorker"]
