"""The learner across processes and hosts: `[learn.distributed]`, and joining the processes.

Every learner process runs the same program on its own devices; `jax.distributed` joins them
into one set of global devices (`jax.devices()`), over which update.py lays one mesh (data
parallel, parameters and optimizer state sharded: sharding.py). Process 0 runs the coordinator
at `coordinator_address`; the others connect to it. As a learner, process 0 reads the replay,
publishes and decides each turn; the others follow it (lockstep.py). Every process must see
the same checkpoint directory (each saves its shards of every version there).

Where the settings come from: the config's `coordinator_address`, `num_processes` and
`process_id` when `coordinator_address` is set; otherwise, when the environment has
`JAX_COORDINATOR_ADDRESS` (read by JAX itself), the processes from `JAX_NUM_PROCESSES` and
`JAX_PROCESS_ID` (read here: JAX has no such variables); otherwise one process, no coordinator.
A cluster JAX detects by itself (Slurm, Open MPI, Kubernetes, Cloud TPU) is not asked.

`initialize` must run before anything touches a JAX backend (`jax.devices()`, the first array):
`jax.distributed.initialize` refuses afterwards, and `local_device_count` (CPU devices per
process) is read only when the CPU backend starts.

A process that dies (kill -9, a crash, its host lost) ends the others. Process 0 gone, its
coordination service goes with it, and JAX's client in every other process aborts it at once
(SIGABRT, "Terminating process because the JAX distributed service detected fatal errors").
Another one gone, the collective process 0 waits in fails on the broken connection: it logs
`learner.peer_lost` and exits EXIT_PEER_LOST (`peer_lost`) at once, and the processes left
follow it. A peer frozen or cut off (no connection reset): the coordination service misses its
heartbeats and JAX aborts every process after `heartbeat_timeout_s`. Restarted, the group
resumes from the newest version that verifies (versions_io.py): a save cut short is not picked up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

import structlog

ENV_ADDRESS, ENV_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
)
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
# A process of the group is gone: restart them all (sysexits' EX_TEMPFAIL, "try again later";
# the daemon and systemd's Restart=on-failure restart it, unlike EX_CONFIG).
EXIT_PEER_LOST = os.EX_TEMPFAIL

log = structlog.get_logger("openpi_rl.learner")


class DistributedConfigError(ValueError):
    """A `[learn.distributed]` setting (or its environment variable) that cannot work."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How many learner processes there are, which one this is, and how state is sharded.
    The defaults are one process: nothing to join."""

    coordinator_address: str | None = None
    """host:port of process 0's coordinator (the same on every process); None: the environment
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), else one process."""
    num_processes: int = 1  # processes in the group, the same on every one of them
    process_id: int = 0  # in [0, num_processes); process 0 publishes versions
    local_device_count: int | None = None
    """CPU devices this process makes (a CPU-only host, tests); None: the platform's devices."""
    initialization_timeout_s: float = 300.0  # give up joining after this long
    heartbeat_timeout_s: float = 100.0  # a peer silent this long counts as dead (all stop)
    fsdp_min_size: int | None = 4096
    """Parameters and optimizer-state arrays with at least this many elements are split across
    the devices (FSDP-style, along their largest dimension the device count divides); smaller
    ones, and all with None, are replicated on every device."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The settings that apply, after the environment: what `initialize` joins."""

    coordinator_address: str | None
    num_processes: int
    process_id: int

    @property
    def joined(self) -> bool:
        """Whether there is a coordinator to join (more than one process, or set anyway)."""
        return self.coordinator_address is not None


def resolve(config: DistributedConfig, environ: Mapping[str, str] | None = None) -> Cluster:
    """The cluster `config` describes, the environment filling in an unset coordinator
    (module docstring). Raises DistributedConfigError naming the key or variable."""
    env = os.environ if environ is None else environ
    problems = problems_of(config, env)
    if problems:
        raise DistributedConfigError("; ".join(f"{k}: {m}" for k, m in problems))
    if config.coordinator_address is not None:
        return Cluster(config.coordinator_address, config.num_processes, config.process_id)
    if env.get(ENV_ADDRESS):
        return Cluster(env[ENV_ADDRESS], int(env[ENV_PROCESSES]), int(env[ENV_PROCESS_ID]))
    return Cluster(None, 1, 0)


def problems_of(
    config: DistributedConfig,
    environ: Mapping[str, str] | None = None,
    minibatch_size: int | None = None,
) -> list[tuple[str, str]]:
    """Every problem of `config` as (key, message), for `openpi-rl check` and `resolve`.
    minibatch_size: the PPO minibatch, which the global device count must divide; checked
    only when `local_device_count` fixes that count (CPU devices; a GPU host's count is known
    once the learner starts)."""
    env = os.environ if environ is None else environ
    key = "learn.distributed."
    out: list[tuple[str, str]] = []
    n, i = config.num_processes, config.process_id
    if not isinstance(n, int) or n < 1:
        out.append((key + "num_processes", f"expected an int >= 1, got {n!r}"))
    elif not isinstance(i, int) or not 0 <= i < n:
        out.append((key + "process_id", f"expected an int in [0, {n}), got {i!r}"))
    address = config.coordinator_address
    if address is not None and not _HOST_PORT.match(address):
        out.append((key + "coordinator_address", f"expected host:port, got {address!r}"))
    elif address is None and env.get(ENV_ADDRESS):
        out += _env_problems(env)
    elif address is None and isinstance(n, int) and n > 1:
        out.append(
            (
                key + "coordinator_address",
                f"num_processes = {n} needs a coordinator: set coordinator_address "
                f"(or {ENV_ADDRESS}, {ENV_PROCESSES} and {ENV_PROCESS_ID})",
            )
        )
    count = config.local_device_count
    if count is not None and (not isinstance(count, int) or count < 1):
        out.append((key + "local_device_count", f"expected an int >= 1 or None, got {count!r}"))
        count = None
    for name in ("initialization_timeout_s", "heartbeat_timeout_s"):
        value = getattr(config, name)
        if not isinstance(value, int | float) or not value > 0 or not math.isfinite(value):
            out.append((key + name, f"expected seconds > 0, got {value!r}"))
    size = config.fsdp_min_size
    if size is not None and (not isinstance(size, int) or size < 0):
        out.append((key + "fsdp_min_size", f"expected an int >= 0 or None, got {size!r}"))
    if count is not None and minibatch_size is not None and not out:
        devices = count * (resolve(config, env).num_processes)
        if minibatch_size % devices:
            out.append(
                (
                    "learn.ppo.minibatch_size",
                    f"expected a multiple of the {devices} devices ({count} per process), "
                    f"got {minibatch_size}",
                )
            )
    return out


def _env_problems(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """Problems of the JAX_* variables that stand in for an unset coordinator."""
    if not _HOST_PORT.match(env[ENV_ADDRESS]):
        return [(ENV_ADDRESS, f"expected host:port, got {env[ENV_ADDRESS]!r}")]
    try:
        n, i = int(env[ENV_PROCESSES]), int(env[ENV_PROCESS_ID])
    except KeyError as e:
        return [(e.args[0], f"unset, while {ENV_ADDRESS} is set")]
    except ValueError as e:
        return [(f"{ENV_PROCESSES}/{ENV_PROCESS_ID}", f"expected ints: {e}")]
    if n < 1 or not 0 <= i < n:
        return [(ENV_PROCESS_ID, f"expected an int in [0, {ENV_PROCESSES}={n}), got {i}")]
    return []


def initialize(config: DistributedConfig, environ: Mapping[str, str] | None = None) -> Cluster:
    """Make this process's devices (`local_device_count`) and join the others; call before
    any JAX backend use. One process with no coordinator joins nothing. Returns the cluster."""
    import jax
    from jax._src import xla_bridge

    cluster = resolve(config, environ)
    if not cluster.joined and config.local_device_count is None:
        return cluster  # nothing to set up
    if xla_bridge.backends_are_initialized():
        raise DistributedConfigError(
            "learn.distributed: initialize() must run before JAX's first use of a device"
        )
    if config.local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", config.local_device_count)
    if cluster.joined:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator_address,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            initialization_timeout=max(1, math.ceil(config.initialization_timeout_s)),
            heartbeat_timeout_seconds=max(1, math.ceil(config.heartbeat_timeout_s)),
        )
    return cluster


def peer_lost(error: object, process_id: int, **context: Any) -> NoReturn:
    """A collective failed: a process of the group is gone. Log `learner.peer_lost` and end this
    process with EXIT_PEER_LOST, now. `os._exit`, not `sys.exit`: a normal exit waits in
    jax.distributed's shutdown barrier for the dead peer until the heartbeat timeout, then JAX
    aborts the process (SIGABRT); and nothing of the group's is left to finish (a version
    counts once its manifest is written; data not marked consumed yet trains once more)."""
    log.error(
        "learner.peer_lost", process=process_id, error=str(error).strip()[:500],
        exit_status=EXIT_PEER_LOST, **context,
        hint="restart every learner process: they resume from the newest complete version",
    )  # fmt: skip
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_PEER_LOST)


__all__ = [
    "EXIT_PEER_LOST",
    "Cluster",
    "DistributedConfig",
    "DistributedConfigError",
    "initialize",
    "peer_lost",
    "problems_of",
    "resolve",
]
