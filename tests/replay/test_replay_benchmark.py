"""benchmarks/replay_ingest.py keeps working: its --quick run ends in one JSON line with the
figures the issue names (timings are not asserted: the machine is shared)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "benchmarks" / "replay_ingest.py"


def test_replay_ingest_quick_reports_its_ratio(tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["rows_per_s"] > 0 and figures["mb_per_s"] > 0
    assert figures["ingest_over_disk"] > 0 and figures["fsync_ingest_over_disk"] > 0


def test_replay_ingest_quick_postgres_reports_pg_over_sqlite(pg_cluster, tmp_path):
    # `pg_cluster`: skips where PostgreSQL is missing; the benchmark starts its own servers.
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--dir", str(tmp_path), "--backend", "postgres",
         "--pg-fast"],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["pg_rows_per_s"] > 0 and figures["pg_fast_mb_per_s"] > 0
    assert len(figures["pg_over_sqlite_rounds"]) == figures["rounds"] == 2
    assert figures["pg_over_sqlite"] > 0 and figures["mb_per_s"] > 0
