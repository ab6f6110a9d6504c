"""`openpi-rl replay stats DIR`: print a replay directory's `ReplayReader.stats()` as JSON.
`openpi-rl replay migrate DIR`: bring a directory written by an older openpi-rl to the current
format (`records.py`), as the policy server does when it opens one."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import tyro

from openpi_rl.replay import schema
from openpi_rl.replay.reader import ReplayReader
from openpi_rl.replay.writer import ReplayConfig, ReplayWriter


@dataclasses.dataclass(frozen=True)
class StatsArgs:
    path: Annotated[Path, tyro.conf.Positional]
    """Replay directory (holds replay.sqlite and segments/)."""


def stats_main(argv: Sequence[str] | None = None) -> int:
    args = tyro.cli(StatsArgs, args=argv, prog="openpi-rl replay stats")
    with ReplayReader(args.path) as reader:
        print(json.dumps(dataclasses.asdict(reader.stats()), indent=2))
    return 0


@dataclasses.dataclass(frozen=True)
class MigrateArgs:
    path: Annotated[Path, tyro.conf.Positional]
    """Replay directory to migrate in place (no server may be writing it)."""


def migrate_main(argv: Sequence[str] | None = None) -> int:
    args = tyro.cli(MigrateArgs, args=argv, prog="openpi-rl replay migrate")
    if not schema.db_path(args.path).exists():
        raise SystemExit(f"{args.path}: no replay database ({schema.DB_NAME}) to migrate")
    ReplayWriter(ReplayConfig(path=args.path)).close()  # opening migrates; one owner at a time
    conn = schema.connect_reader(args.path)
    try:
        legacy = schema.legacy_max_id(conn)
    finally:
        conn.close()
    out = {"path": str(args.path), "format": schema.SCHEMA_VERSION, "legacy_max_id": legacy}
    print(json.dumps(out))
    return 0
