"""A throw-away PostgreSQL cluster's CPU share, for benchmarks that time a server beside it.

Every PostgreSQL process calls setsid, so with the kernel's autogroup each one weighs as much as
the benchmark's whole session (its robots and servers together). On a shared host the shipped
units weigh them otherwise: the policy server has `CPUWeight=1000`, Debian's postgresql unit
the default 100. `weigh_cluster` puts the cluster's processes in one cpu cgroup at such a share.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CPU_GROUP_V1 = Path("/sys/fs/cgroup/cpu/openpi-bench-postgresql")  # cgroup v1's cpu hierarchy
CPU_GROUP_V2 = Path("/sys/fs/cgroup/openpi-bench-postgresql")


def weigh_cluster(cluster, weight: float) -> str:
    """Put the cluster's postmaster and its children (the backends it forks later inherit the
    group) in a cpu cgroup weighing `weight` of a default one; says what it did."""
    if weight <= 0:
        return "database processes left as started"
    pm = cluster.postmaster_pid()
    pids = [pm] + [int(d) for d in os.listdir("/proc") if d.isdigit() and _ppid(int(d)) == pm]
    group, knob, value = (
        (CPU_GROUP_V1, "cpu.shares", round(1024 * weight))
        if (CPU_GROUP_V1.parent / "cpu.shares").exists()
        else (CPU_GROUP_V2, "cpu.weight", round(100 * weight))
    )
    try:
        group.mkdir(exist_ok=True)
        (group / knob).write_text(str(max(value, 2)))
        for pid in pids:
            (group / "cgroup.procs").write_text(str(pid))
    except OSError as e:
        return f"database processes left as started (cpu cgroup: {e})"
    return f"database processes in {group} ({knob}={value}: {weight:g} of the servers' weight)"


def unweigh_cluster() -> None:
    """Remove the cgroup `weigh_cluster` made, once its processes are gone."""
    for group in (CPU_GROUP_V1, CPU_GROUP_V2):
        with contextlib.suppress(OSError):
            group.rmdir()


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
