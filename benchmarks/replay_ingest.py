"""Ingest throughput of the replay store against the disk it sits on.

150 KB observations (+ a 50x32 float32 action chunk each) go through `ReplayWriter` until all are
committed, with no fsync and with fsync every 50 ms; the reference writes the same bytes
sequentially to one file on the same filesystem with one fsync at the end. Trials alternate
(disk, ingest, ingest+fsync) and medians are taken: the machine is shared. Plain SQLite WAL blobs
reach ~0.5 of the disk (WAL writes each page twice); the goal here is >= 0.8.

    python benchmarks/replay_ingest.py            # 2000 rows (300 MB) x 3 rounds
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


@dataclasses.dataclass
class Args:
    rows: int = 2000
    obs_kb: int = 150
    rounds: int = 3  # alternations of (disk, ingest, ingest+fsync); medians reported
    fsync_interval_s: float = 0.05
    dir: Path | None = None  # parent of the scratch directory (default: the system temp dir)
    quick: bool = False  # 300 rows, 2 rounds


def disk_reference(root: Path, obs: bytes, rows: int) -> float:
    """Seconds to write `rows` x `obs` sequentially to one file and fsync it once."""
    path = root / "reference.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(rows):
            f.write(obs)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    path.unlink()
    return dt


def ingest(root: Path, obs: bytes, rows: int, fsync: float | None) -> tuple[float, list[float]]:
    """Seconds until all rows are committed, and each append call's latency."""
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
            except ReplayFull:
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
    times: dict[str, list[float]] = {"disk": [], "ingest": [], "ingest_fsync": []}
    lat: list[float] = []
    try:
        for r in range(rounds):
            for name in times:
                os.sync()  # start each trial with no dirty pages from the last one
                if name == "disk":
                    times[name].append(disk_reference(root, obs, rows))
                else:
                    fsync = args.fsync_interval_s if name == "ingest_fsync" else None
                    dt, lat_r = ingest(root, obs, rows, fsync)
                    times[name].append(dt)
                    if name == "ingest":
                        lat += lat_r
                print(f"round {r} {name}: {mb / times[name][-1]:.0f} MB/s", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    lat_us = np.asarray(lat) * 1e6
    print_json(
        {
            "rows_per_s": rows / med["ingest"],
            "mb_per_s": mb / med["ingest"],
            "ingest_over_disk": med["disk"] / med["ingest"],
            "disk_mb_per_s": mb / med["disk"],
            "fsync_rows_per_s": rows / med["ingest_fsync"],
            "fsync_mb_per_s": mb / med["ingest_fsync"],
            "fsync_ingest_over_disk": med["disk"] / med["ingest_fsync"],
            "append_us_p50": float(np.percentile(lat_us, 50)),
            "append_us_p99": float(np.percentile(lat_us, 99)),
            "rows": rows,
            "obs_bytes": len(obs),
            "rounds": rounds,
        }
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
