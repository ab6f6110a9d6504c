"""The atheris harness (benchmarks/fuzz_atheris.py) runs each target and finds no failing
input in a short seeded run. atheris is an optional extra (`.[fuzz]`): skipped without it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")
SCRIPT = Path(__file__).parents[2] / "benchmarks" / "fuzz_atheris.py"


@pytest.mark.slow
def test_atheris_targets_run_seeded_and_find_nothing(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--runs", "500", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=True)
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(results) == {"wire", "bridge", "http_head"}
    for r in results.values():
        assert r["tried"] >= 500 and r["crashes"] == 0, r
