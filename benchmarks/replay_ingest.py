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

`--backend postgres` writes the same rows through `ReplayConfig(path=url).create()` (the
PostgreSQL writer: observation records in the `observations` table, in the row's transaction)
into a throw-away server (`LocalCluster`, in the system temp dir) with a real server's default
durability (fsync on, synchronous_commit on: every commit waits for its WAL on disk), interleaved
with the SQLite ingest (`ingest`, and `ingest_fsync`, whose fsync every 50 ms is the nearer
durability) in each round; `pg_over_sqlite` is PG's MB/s over SQLite's default configuration's,
per round (goal >= 0.5). `pg_segments` is the same server with the writer's observation records
in segment files beside it (`ReplayConfig.observations_dir`, in the scratch directory): the
database holds the index rows only, as SQLite does. `--pg-fast` adds a second server with the
tests' settings (fsync and full_page_writes off). `--backend both`: the disk references as well.

    python benchmarks/replay_ingest.py            # 2000 rows (300 MB) x 5 rounds
    python benchmarks/replay_ingest.py --quick    # smoke run
    python benchmarks/replay_ingest.py --backend postgres --pg-fast
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
from typing import Literal

import numpy as np
import structlog
import tyro

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_json

from openpi_rl.replay import ReplayConfig, ReplayFull

SQLITE_TRIALS = ("disk", "ingest", "disk_fsync", "ingest_fsync")


@dataclasses.dataclass
class Args:
    rows: int = 2000
    obs_kb: int = 150
    rounds: int = 5  # each runs every trial once; ratios are per round, medians reported
    fsync_interval_s: float = 0.05
    dir: Path | None = None  # parent of the scratch directory (default: the system temp dir)
    backend: Literal["sqlite", "postgres", "both"] = "sqlite"
    """postgres: the PostgreSQL writer beside SQLite's ingest trials; both: every trial."""
    pg_fast: bool = False  # postgres: also a server with fsync/synchronous_commit off (tests')
    quick: bool = False  # 300 rows, 2 rounds


# Ratios printed per round: (trial, reference) -> the trial's MB/s over the reference's.
RATIOS = (
    ("ingest", "disk"), ("ingest_fsync", "disk"),
    ("pg", "ingest"), ("pg", "ingest_fsync"), ("pg_segments", "ingest"),
    ("pg_segments", "ingest_fsync"), ("pg_fast", "ingest"),
)  # fmt: skip


def trials(args: Args) -> tuple[str, ...]:
    """The trials one round runs, for `args.backend` (SQLite's and PostgreSQL's alternate)."""
    pg_fast = ("pg_fast",) if args.pg_fast else ()
    if args.backend == "sqlite":
        return SQLITE_TRIALS
    if args.backend == "postgres":
        return ("ingest", "pg", "ingest_fsync", "pg_segments", *pg_fast)
    return ("disk", "ingest", "pg", "disk_fsync", "ingest_fsync", "pg_segments", *pg_fast)


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


def ingest(
    location: str, obs: bytes, rows: int, fsync: float | None, observations_dir: Path | None = None
) -> tuple[float, list[float]]:
    """Seconds from the first append until all rows are committed, and each append's latency,
    into a new replay at `location` (a directory, or a PostgreSQL database's URL; with
    `observations_dir`, its records in segment files there)."""
    writer = ReplayConfig(
        path=location, fsync_interval_s=fsync, observations_dir=observations_dir
    ).create()
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
    committed = writer.counters()["transitions_committed"]
    writer.close()
    if committed != rows:
        raise RuntimeError(f"{location}: {committed} of {rows} rows committed")
    return dt, lat


def start_cluster(options: tuple[str, ...]):
    """A throw-away PostgreSQL server; `options` () keeps a real server's durability."""
    from openpi_rl.replay.pg_cluster import LocalCluster

    return LocalCluster(options=options).start()


def drop_database(cluster, name: str) -> None:
    """Drop a trial's database so the next starts on an empty one (and the disk stays free)."""
    import psycopg

    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}"')


def main(args: Args) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # quiet
    rows, rounds = (300, 2) if args.quick else (args.rows, args.rounds)
    obs = np.random.default_rng(0).bytes(args.obs_kb * 1024)
    mb = rows * len(obs) / 1e6
    names = trials(args)
    root = Path(tempfile.mkdtemp(prefix="replay_ingest_", dir=args.dir))
    times: dict[str, list[float]] = {name: [] for name in names}
    lat: dict[str, list[float]] = {name: [] for name in names if not name.startswith("disk")}
    clusters: dict = {}
    try:
        if "pg" in names:
            from openpi_rl.replay.pg_cluster import FAST

            clusters["pg"] = start_cluster(())  # a real server's durability
            if "pg_fast" in names:
                clusters["pg_fast"] = start_cluster(FAST)
            print(
                f"PostgreSQL {clusters['pg'].bin.parent.name} in {clusters['pg'].root}",
                file=sys.stderr,
            )
        for r in range(rounds):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                fsync = args.fsync_interval_s if name.endswith("_fsync") else None
                os.sync()  # start each trial with no dirty pages from the last one
                if name.startswith("disk"):
                    times[name].append(disk_reference(root, obs, rows, fsync))
                elif name.startswith("pg"):
                    cluster = clusters["pg" if name == "pg_segments" else name]
                    url = cluster.create_database(f"ingest_{name}_{r}")
                    obs_dir = root / "pg_observations" if name == "pg_segments" else None
                    dt, lat_r = ingest(url, obs, rows, None, obs_dir)
                    drop_database(cluster, f"ingest_{name}_{r}")
                    if obs_dir is not None:
                        shutil.rmtree(obs_dir)
                    times[name].append(dt)
                    lat[name] += lat_r
                else:
                    dt, lat_r = ingest(str(root / "replay"), obs, rows, fsync)
                    shutil.rmtree(root / "replay")
                    times[name].append(dt)
                    lat[name] += lat_r
                print(f"round {r} {name}: {mb / times[name][-1]:.0f} MB/s", file=sys.stderr)
            print(f"round {r}: " + ", ".join(
                f"{a}/{b} {times[b][-1] / times[a][-1]:.2f}"
                for a, b in RATIOS if a in times and b in times
            ), file=sys.stderr)  # fmt: skip
    finally:
        for cluster in clusters.values():
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)

    def ratio(ref: str, name: str) -> float:  # median over rounds of the in-round ratio
        return statistics.median(a / b for a, b in zip(times[ref], times[name], strict=True))

    def rounds_of(ref: str, name: str) -> list[float]:
        return [round(a / b, 3) for a, b in zip(times[ref], times[name], strict=True)]

    med = {k: statistics.median(v) for k, v in times.items()}

    def append_us(name: str, q: float) -> float:
        return float(np.percentile(np.asarray(lat[name]) * 1e6, q))

    # One line, the figures first: SQLite's default configuration (no fsync), against
    # `disk` when it ran, then the PostgreSQL writer against it on the same rows.
    out: dict = {"rows_per_s": rows / med["ingest"], "mb_per_s": mb / med["ingest"]}
    if "disk" in times:
        out |= {"ingest_over_disk": ratio("disk", "ingest"), "disk_mb_per_s": mb / med["disk"]}
    out |= {
        "fsync_rows_per_s": rows / med["ingest_fsync"],
        "fsync_mb_per_s": mb / med["ingest_fsync"],
    }
    if "disk" in times:
        out |= {
            "fsync_ingest_over_disk": ratio("disk", "ingest_fsync"),
            "disk_fsync_mb_per_s": mb / med["disk_fsync"],
            "fsync_ingest_over_disk_fsync": ratio("disk_fsync", "ingest_fsync"),
            "ingest_over_disk_rounds": rounds_of("disk", "ingest"),
        }
    for pg in ("pg", "pg_segments", "pg_fast"):
        if pg in times:
            out |= {
                f"{pg}_rows_per_s": rows / med[pg],
                f"{pg}_mb_per_s": mb / med[pg],
                f"{pg}_over_sqlite": ratio("ingest", pg),
                f"{pg}_over_sqlite_fsync": ratio("ingest_fsync", pg),
                f"{pg}_over_sqlite_rounds": rounds_of("ingest", pg),
                f"{pg}_append_us_p50": append_us(pg, 50),
                f"{pg}_append_us_p99": append_us(pg, 99),
            }
    sqlite_lat = np.asarray(lat["ingest"] + lat["ingest_fsync"]) * 1e6
    out |= {
        "append_us_p50": float(np.percentile(sqlite_lat, 50)),
        "append_us_p99": float(np.percentile(sqlite_lat, 99)),
        "rows": rows,
        "obs_bytes": len(obs),
        "rounds": rounds,
        "backend": args.backend,
        "fsync_interval_s": args.fsync_interval_s,
    }
    print_json(out)


if __name__ == "__main__":
    main(tyro.cli(Args))
