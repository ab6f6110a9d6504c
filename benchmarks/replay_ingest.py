"""Ingest throughput of the replay store against the disk it sits on.

150 KB observations (+ a 50x32 float32 action chunk each) go through `ReplayWriter`, timed from
the first `append_transition` until `flush()` returns (every row committed), in the service's
default configuration (no fsync: a committed row survives `kill -9`) and with an fsync every
50 ms (power loss). The reference writes the same observation bytes sequentially to one file on
the same filesystem: `disk` with one fsync at the end (the issue's reference), `disk_fsync`
with an fsync every 50 ms as well (the fsync ingest's own policy). Each round runs the four
trials, in an order that rotates from round to round, after an `os.sync()`; a ratio is taken
within a round (the machine is shared and its load drifts) and the median over rounds is
reported. Plain SQLite WAL blobs reach ~0.5 of the disk (WAL writes each page twice); the goal
is >= 0.8 for the default configuration.

    python benchmarks/replay_ingest.py            # 2000 rows (300 MB) x 5 rounds
    python benchmarks/replay_ingest.py --quick    # smoke run
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import structlog
import tyro

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl.replay import ReplayConfig, ReplayFull, ReplayWriter

TRIALS = ("disk", "ingest", "disk_fsync", "ingest_fsync")


@dataclasses.dataclass
class Args:
    rows: int = 2000
    obs_kb: int = 150
    rounds: int = 5  # each runs every trial once; ratios are per round, medians reported
    fsync_interval_s: float = 0.05
    dir: Path | None = None  # parent of the scratch directory (default: the system temp dir)
    quick: bool = False  # 300 rows, 2 rounds


def disk_reference(root: Path, obs: bytes, rows: int, fsync_interval_s: float | None) -> float:
    """Seconds to write `rows` x `obs` sequentially to one file and fsync it at the end (and,
    with `fsync_interval_s`, that often while writing)."""
    path = root / "reference.bin"
    t = last_sync = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(rows):
            f.write(obs)
            if fsync_interval_s is not None and time.perf_counter() - last_sync >= fsync_interval_s:
                os.fdatasync(f.fileno())
                last_sync = time.perf_counter()
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    path.unlink()
    return dt


def ingest(root: Path, obs: bytes, rows: int, fsync: float | None) -> tuple[float, list[float]]:
    """Seconds from the first append until all rows are committed, and each append's latency."""
    path = root / "replay"
    writer = ReplayWriter(ReplayConfig(path=path, fsync_interval_s=fsync))
    actions = np.zeros((50, 32), np.float32)
    lat = []
    t = time.perf_counter()
    for i in range(rows):
        while True:
            t0 = time.perf_counter()
            try:
                writer.append_transition("r0", "e0", i, 1, obs, actions, None, -1.0, 0.0, t0)
                lat.append(time.perf_counter() - t0)
                break
            except ReplayFull:  # the writer is behind: the caller of a benchmark just retries
                continue
    writer.flush()
    dt = time.perf_counter() - t
    writer.close()
    shutil.rmtree(path)
    return dt, lat


def main(args: Args) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # quiet
    rows, rounds = (300, 2) if args.quick else (args.rows, args.rounds)
    obs = np.random.default_rng(0).bytes(args.obs_kb * 1024)
    mb = rows * len(obs) / 1e6
    root = Path(tempfile.mkdtemp(prefix="replay_ingest_", dir=args.dir))
    times: dict[str, list[float]] = {name: [] for name in TRIALS}
    lat: list[float] = []
    try:
        for r in range(rounds):
            for k in range(len(TRIALS)):
                name = TRIALS[(r + k) % len(TRIALS)]
                fsync = args.fsync_interval_s if name.endswith("_fsync") else None
                os.sync()  # start each trial with no dirty pages from the last one
                if name.startswith("disk"):
                    times[name].append(disk_reference(root, obs, rows, fsync))
                else:
                    dt, lat_r = ingest(root, obs, rows, fsync)
                    times[name].append(dt)
                    lat += lat_r
                print(f"round {r} {name}: {mb / times[name][-1]:.0f} MB/s", file=sys.stderr)
            print(
                f"round {r}: ingest/disk {times['disk'][-1] / times['ingest'][-1]:.2f}, "
                f"ingest_fsync/disk {times['disk'][-1] / times['ingest_fsync'][-1]:.2f}",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def ratio(ref: str, name: str) -> float:  # median over rounds of the in-round ratio
        return statistics.median(a / b for a, b in zip(times[ref], times[name], strict=True))

    med = {k: statistics.median(v) for k, v in times.items()}
    lat_us = np.asarray(lat) * 1e6
    # One line, the figures first: the default configuration (no fsync) against `disk`.
    print_json(
        {
            "rows_per_s": rows / med["ingest"],
            "mb_per_s": mb / med["ingest"],
            "ingest_over_disk": ratio("disk", "ingest"),
            "disk_mb_per_s": mb / med["disk"],
            "fsync_rows_per_s": rows / med["ingest_fsync"],
            "fsync_mb_per_s": mb / med["ingest_fsync"],
            "fsync_ingest_over_disk": ratio("disk", "ingest_fsync"),
            "disk_fsync_mb_per_s": mb / med["disk_fsync"],
            "fsync_ingest_over_disk_fsync": ratio("disk_fsync", "ingest_fsync"),
            "ingest_over_disk_rounds": [
                round(a / b, 3) for a, b in zip(times["disk"], times["ingest"], strict=True)
            ],
            "append_us_p50": float(np.percentile(lat_us, 50)),
            "append_us_p99": float(np.percentile(lat_us, 99)),
            "rows": rows,
            "obs_bytes": len(obs),
            "rounds": rounds,
            "fsync_interval_s": args.fsync_interval_s,
        }
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
