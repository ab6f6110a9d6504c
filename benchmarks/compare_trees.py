"""One benchmark on two source trees, interleaved, so a refactor's before and after see the same
machine noise: each round runs the benchmark of tree A, then of tree B (each tree's own script
and its own `src/` and `client/src/` first on the path, the current interpreter and its
packages for the rest), and the last JSON line of each run is kept.

    git worktree add /tmp/before <commit>
    python benchmarks/compare_trees.py --before /tmp/before --bench replay_ingest -- --quick

Prints one JSON object: {"bench", "before": [results...], "after": [results...]}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import tyro

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass
class Args:
    before: Path  # a checkout of the old code (e.g. a git worktree)
    bench: str  # a script name in benchmarks/ without .py
    after: Path = HERE.parent  # this tree
    rounds: int = 2
    bench_args: tyro.conf.Positional[tuple[str, ...]] = ()  # passed to the benchmark


def run(tree: Path, bench: str, args: tuple[str, ...]) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), str(tree / "client" / "src")])
    cmd = [sys.executable, str(tree / "benchmarks" / f"{bench}.py"), *args]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{tree}: {bench} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(a: Args) -> dict:
    result: dict = {"bench": a.bench, "args": list(a.bench_args), "before": [], "after": []}
    for r in range(a.rounds):
        for side, tree in (("before", a.before), ("after", a.after)):
            result[side].append(run(tree, a.bench, a.bench_args))
            print(f"round {r} {side}: {json.dumps(result[side][-1])}", file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(Args))))
