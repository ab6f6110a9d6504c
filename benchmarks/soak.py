"""Soak: 16 robots at 50 Hz for 10 minutes against `openpi-rl daemon` with the learner training.

    python benchmarks/soak.py                # 10 minutes, RSS sampled every minute
    python benchmarks/soak.py --quick        # 1 minute, sampled every 15 s

The service is the demo's (server, bridge, learner as the daemon's children; gaussian_mlp on
InvertedPendulum-v5's 4 observations). The robots are threads in `--robot-procs` separate
processes (this script run again with `--worker`), so the robot side neither shares this
process's GIL nor its memory. Reported: round-trip p50 / p99 over every request, failures
(any request that raised), the RSS of every service process (daemon, server, bridge, learner;
VmRSS from /proc) sampled each `--sample-s` with its growth between `--baseline-s` (minute 2)
and the end, the replay's bytes on disk against its retention cap, and the versions the
learner published meanwhile. The last line is one JSON object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from array import array
from pathlib import Path

import numpy as np
import tyro

SERVICE_ROLES = ("daemon", "serve", "bridge", "learn")


@dataclasses.dataclass(frozen=True)
class Args:
    minutes: float = 10.0
    robots: int = 16
    hz: float = 50.0
    """Chunks per second per robot."""
    robot_procs: int = 2
    """Processes the robots' threads are spread over."""
    sample_s: float = 60.0
    """RSS and replay size sampled this often."""
    baseline_s: float = 120.0
    """RSS growth is measured from the sample at this time to the last one."""
    retention_max_bytes: int | None = 64 * 2**20
    """The replay's retention cap, set in [serve] when the server's config has the field. 16
    state-only robots write ~500 B per served chunk (index row, segment bytes), ~190 MB in
    10 minutes: 64 MiB is passed after ~3 minutes, so the cap is held for most of the run."""
    seed: int = 0
    quick: bool = False
    """1 minute, sampled every 15 s, growth from 15 s."""
    workdir: str | None = None
    keep: bool = False
    # -- a robots process (internal)
    worker: bool = False
    endpoint: str = ""
    names: str = ""
    seconds: float = 0.0
    out: str = ""


# -- robots process


def robots_worker(args: Args) -> None:
    """Run `args.names` at `args.hz` for `args.seconds`; write latencies and failures."""
    from openpi_rl.train.envs import EnvBatch
    from openpi_rl_client import PolicyClient

    names = args.names.split(",")
    lat = {n: array("d") for n in names}
    failures = {n: 0 for n in names}
    late = {n: 0 for n in names}
    t_end = time.monotonic() + args.seconds

    def run(name: str, seed: int) -> None:
        env = EnvBatch("InvertedPendulum-v5", 1, seed)
        period, tick = 1.0 / args.hz, time.monotonic()
        episode = f"{name}-{uuid.uuid4().hex[:12]}"
        with PolicyClient(args.endpoint, name, timeout_s=1.0, retries=2) as client:
            while (now := time.monotonic()) < t_end:
                tick += period
                if tick < now - period:  # more than a tick behind: skip, as a robot would
                    late[name] += 1
                    tick = now
                time.sleep(max(0.0, tick - time.monotonic()))
                t0 = time.perf_counter()
                try:
                    out = client.infer({"state": env.obs[0]}, episode_id=episode)
                    lat[name].append((time.perf_counter() - t0) * 1e3)
                    step, _ = env.step(out.actions[None])
                    client.report(
                        out.transition_id, reward=float(step.rewards[0]),
                        done=bool(step.terminated[0]), truncated=bool(step.truncated[0]),
                    )  # fmt: skip
                except Exception as e:  # counted: the soak's "failures"
                    failures[name] += 1
                    print(f"{name}: {e!r:.200}", file=sys.stderr, flush=True)
                    continue
                if step.finished:
                    episode = f"{name}-{uuid.uuid4().hex[:12]}"
        env.close()

    threads = [
        threading.Thread(target=run, args=(n, args.seed + 1000 * i), name=n)
        for i, n in enumerate(names)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = Path(args.out)
    np.save(out.with_suffix(".npy"), np.concatenate([np.asarray(v) for v in lat.values()]))
    out.write_text(json.dumps({"failures": sum(failures.values()), "late": sum(late.values())}))


# -- the soak


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def replay_disk(root: Path) -> dict[str, int]:
    """Bytes on disk of a replay directory by part: db, wal, shm, segments (files only: a
    stat each, no SQL, so sampling it often disturbs nothing)."""
    out = dict.fromkeys(("db", "wal", "shm", "segments"), 0)
    for name, key in (
        ("replay.sqlite", "db"),
        ("replay.sqlite-wal", "wal"),
        ("replay.sqlite-shm", "shm"),
    ):
        with contextlib.suppress(FileNotFoundError):
            out[key] = (root / name).stat().st_size
    for seg in (root / "segments").glob("*.seg"):
        with contextlib.suppress(FileNotFoundError):  # retention deleted it meanwhile
            out["segments"] += seg.stat().st_size
    return out


class DiskSampler(threading.Thread):
    """Samples `replay_disk` every `period_s`; keeps the largest total and its breakdown."""

    def __init__(self, root: Path, period_s: float = 1.0):
        super().__init__(name="replay-disk", daemon=True)
        self.root, self.period_s = root, period_s
        self.max_total, self.at_max = 0, {}
        self.last: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            self.sample()

    def sample(self) -> dict[str, int]:
        parts = replay_disk(self.root)
        total = sum(parts.values())
        self.last = parts
        if total > self.max_total:
            self.max_total, self.at_max = total, parts
        return parts

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


def _service(workdir: Path, args: Args):
    """The chaos run's service (the demo's config), with the replay's retention cap in
    [serve] when ServeConfig has a field for it. Returns (service, cap or None, why not)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from chaos import Service

    from openpi_rl.policy_server.serve import ServeConfig

    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    cap, missing = args.retention_max_bytes, None
    if cap is not None and "retention_max_bytes" not in fields:
        missing = (
            "ServeConfig has no retention_max_bytes (nor retention_max_rows / segment_max_bytes):"
            " build_server() makes ReplayConfig(path, commit_interval_s) only, so the service"
            " cannot cap its replay"
        )
        cap = None
    extra = ""
    if cap is not None:
        extra = f"retention_max_bytes = {cap}\n"
        if "segment_max_bytes" in fields:  # retention deletes whole segments: several per cap
            extra += f"segment_max_bytes = {max(cap // 8, 2**20)}\n"
    return Service(workdir, args.robots, args.seed, serve_extra=extra), cap, missing


def run(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(args, minutes=1.0, sample_s=15.0, baseline_s=15.0)
    from openpi_rl.replay import ReplayReader

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="openpi-rl-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    svc, cap, missing = _service(workdir, args)
    if missing:
        print(f"soak: replay cap not set: {missing}", flush=True)
    print(f"soak: starting the service in {workdir}", file=sys.stderr, flush=True)
    svc.start()
    disk = DiskSampler(svc.replay_dir)
    disk.start()
    seconds = args.minutes * 60.0
    names = [f"soak-{i}" for i in range(args.robots)]
    workers = []
    for p in range(args.robot_procs):
        part = names[p :: args.robot_procs]
        cmd = [
            sys.executable, __file__, "--worker", "--endpoint", svc.service.endpoint,
            "--names", ",".join(part), "--seconds", str(seconds), "--hz", str(args.hz),
            "--seed", str(args.seed + p), "--out", str(workdir / f"robots-{p}.json"),
        ]  # fmt: skip
        workers.append(subprocess.Popen(cmd))
    t0 = time.monotonic()
    pids = {"daemon": svc.daemon.proc.pid, **svc.children()}
    samples: list[dict] = []
    restarted: list[str] = []
    daemon_rc = None
    try:
        next_sample = t0 + args.sample_s
        while any(w.poll() is None for w in workers):
            time.sleep(min(1.0, max(0.0, next_sample - time.monotonic())))
            if time.monotonic() < next_sample:
                continue
            next_sample += args.sample_s
            now = {"daemon": svc.daemon.proc.pid, **svc.children()}
            for role in SERVICE_ROLES:
                if now.get(role) != pids.get(role) and role not in restarted:
                    restarted.append(role)
            parts = disk.sample()
            replay = sum(parts.values())
            s = {
                "t_s": round(time.monotonic() - t0),
                "rss_mib": {
                    role: round((rss_kib(now[role]) or 0) / 1024, 1)
                    for role in SERVICE_ROLES
                    if role in now
                },
                "robots_rss_mib": [round((rss_kib(w.pid) or 0) / 1024, 1) for w in workers],
                "replay_bytes": replay,
                "replay_parts": parts,
            }
            samples.append(s)
            print(
                f"[{s['t_s']:4d} s] RSS MiB "
                + ", ".join(f"{k} {v}" for k, v in s["rss_mib"].items())
                + f" | robots {s['robots_rss_mib']} | replay {replay / 2**20:.1f} MiB ("
                + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in parts.items())
                + (f"; cap {cap / 2**20:.0f} MiB)" if cap else ")"),
                flush=True,
            )
    finally:
        for w in workers:
            try:
                w.wait(60)
            except subprocess.TimeoutExpired:
                w.kill()
        try:
            disk.stop()
            with ReplayReader(svc.replay_dir) as r:
                stats = r.stats()
            from chaos import newest_version

            versions = newest_version(svc.checkpoint_dir)
        finally:
            daemon_rc = svc.daemon.close()
    lat = np.concatenate(
        [np.load(workdir / f"robots-{p}.npy") for p in range(args.robot_procs)]
    )  # fmt: skip
    results = [
        json.loads((workdir / f"robots-{p}.json").read_text()) for p in range(args.robot_procs)
    ]
    failures = sum(r["failures"] for r in results)
    base = min(samples, key=lambda s: abs(s["t_s"] - args.baseline_s)) if samples else None
    growth = {}
    if base is not None:
        last = samples[-1]
        for role, mib in last["rss_mib"].items():
            b = base["rss_mib"].get(role)
            if b:
                growth[role] = round(mib / b - 1.0, 4)
    # The largest on-disk total seen (sampled every second), not only the minute samples.
    replay_max = max([s["replay_bytes"] for s in samples] + [stats.bytes_total, disk.max_total])
    figures = {
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "failures": failures,
        "rss_growth_max": max(growth.values(), default=None),
        "replay_bytes": replay_max,
        "replay_cap_bytes": cap,
        "rss_growth": growth,
        "rss_baseline_s": None if base is None else base["t_s"],
        "requests": int(lat.size),
        "target_requests": int(args.robots * args.hz * seconds),
        "late_ticks": sum(r["late"] for r in results),
        "replay_rows": stats.rows,
        "replay_parts_at_max": disk.at_max,
        "replay_parts_final": disk.last,
        "versions_published": versions,
        "restarted": restarted,
        "replay_cap_missing": missing,
        "daemon_rc": daemon_rc,
        "minutes": args.minutes,
    }
    cap_txt = f"{cap / 2**20:.0f} MiB" if cap else "none (see above)"
    print(
        f"soak: {args.robots} robots at {args.hz:g} Hz for {args.minutes:g} min: "
        f"{lat.size:,} requests (target {figures['target_requests']:,}), p50 "
        f"{figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, failures {failures}; RSS growth "
        f"from {figures['rss_baseline_s']} s to the end: "
        + ", ".join(f"{k} {v:+.1%}" for k, v in growth.items())
        + f"; replay max {replay_max / 2**20:.1f} MiB, cap {cap_txt}; learner versions "
        f"{versions}; restarted {restarted or 'none'}; daemon exit {daemon_rc}",
        flush=True,
    )
    if args.workdir is None and not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return figures


def main(args: Args) -> None:
    if args.worker:
        robots_worker(args)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the daemon on the way out
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(tyro.cli(Args))
