"""`openpi-rl replay stats DIR`: print a replay directory's `ReplayReader.stats()` as JSON."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import tyro

from openpi_rl.replay.reader import ReplayReader


@dataclasses.dataclass(frozen=True)
class StatsArgs:
    path: Annotated[Path, tyro.conf.Positional]
    """Replay directory (holds replay.sqlite and segments/)."""


def stats_main(argv: Sequence[str] | None = None) -> int:
    args = tyro.cli(StatsArgs, args=argv, prog="openpi-rl replay stats")
    with ReplayReader(args.path) as reader:
        print(json.dumps(dataclasses.asdict(reader.stats()), indent=2))
    return 0
