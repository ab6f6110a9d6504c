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
    path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PATH")]
    """Replay directory (holds replay.sqlite and segments/), or its postgresql:// URL."""


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


@dataclasses.dataclass(frozen=True)
class ExportLeRobotArgs:
    replay: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="REPLAY")]
    """Replay directory or postgresql:// URL to read (a live one too: reading does not disturb
    the server)."""
    out: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="OUT")]
    """New directory for the LeRobot dataset (must not exist)."""
    robot: str | None = None
    """Only this robot's episodes."""
    min_version: int | None = None
    """Only chunks served by this policy version or newer."""
    max_version: int | None = None
    """Only chunks served by this policy version or older."""
    success_only: bool = False
    """Only episodes with a success press (or event) credited to them."""
    takeovers_only: bool = False
    """Only episodes in which an operator took over at least one chunk."""
    fps: int | None = None
    """Frames (served chunks) per second; default: estimated from the stored serving times."""
    vcodec: str = "libsvtav1"
    """Camera videos' codec (LeRobot's default; h264 when PyAV's FFmpeg lacks it)."""
    crf: int = 30
    """Camera videos' quality (lower: closer to the images, larger files)."""
    robot_type: str | None = None
    """`robot_type` in meta/info.json (e.g. aloha), for loaders that look at it."""


def _progress(description: str):
    """A rich progress bar on stderr (stdout keeps the JSON result) and its advance(n, total)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(description, total=None)
    return bar, lambda n, total: bar.update(task, advance=n, total=total)


def export_lerobot_main(argv: Sequence[str] | None = None) -> int:
    """`openpi-rl replay export-lerobot REPLAY OUT`: episodes as a LeRobot v3.0 dataset."""
    from openpi_rl.replay.lerobot_export import ExportFilter, export_lerobot

    args = tyro.cli(ExportLeRobotArgs, args=argv, prog="openpi-rl replay export-lerobot")
    flt = ExportFilter(
        args.robot, args.min_version, args.max_version, args.success_only, args.takeovers_only
    )
    try:
        reader = ReplayReader(args.replay)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    with reader:
        bar, advance = _progress("export")
        try:
            with bar:
                result = export_lerobot(
                    reader, args.out, flt, args.fps, args.vcodec, args.crf, args.robot_type,
                    progress=advance,
                )  # fmt: skip
        except (ValueError, FileExistsError) as e:
            raise SystemExit(f"export-lerobot: {e}") from None
    out = {"path": str(result.path), "episodes": result.episodes, "frames": result.frames}
    print(json.dumps({**out, "fps": result.fps}))
    return 0


@dataclasses.dataclass(frozen=True)
class ImportLeRobotArgs:
    dataset: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="DATASET")]
    """LeRobot dataset directory (format v3.0)."""
    replay: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="REPLAY")]
    """Replay directory to append to (created if missing; stop the server that writes it, or
    import into a new one and point the learner's replay_dir at it), or a postgresql:// URL
    (servers may keep writing it: each writer has its own ids)."""
    policy_version: int | None = None
    """Version stamped on the rows; default: the newest in REPLAY (0 if empty), so the learner's
    policy-lag filter keeps them."""
    keep_versions: bool = False
    """Keep the dataset's policy_version column instead (an archive's round trip)."""
    robot_id: str | None = None
    """The rows' robot; default: the dataset's per-episode robot_id, else `lerobot`."""
    episode_prefix: str = "demo-"
    """Prefix of the imported episode ids (keeps them apart from the robots' own)."""


def import_lerobot_main(argv: Sequence[str] | None = None) -> int:
    """`openpi-rl replay import-lerobot DATASET REPLAY`: frames as demonstration rows (BC)."""
    from openpi_rl.replay.lerobot_import import import_lerobot
    from openpi_rl.replay.writer import ReplayLocked

    args = tyro.cli(ImportLeRobotArgs, args=argv, prog="openpi-rl replay import-lerobot")
    try:
        bar, advance = _progress("import")
        with bar:
            result = import_lerobot(
                args.dataset, args.replay, args.policy_version, args.keep_versions,
                args.robot_id, args.episode_prefix, progress=advance,
            )  # fmt: skip
    except (ValueError, FileNotFoundError, ReplayLocked) as e:
        raise SystemExit(f"import-lerobot: {e}") from None
    out = {"path": str(result.path), "episodes": result.episodes, "rows": result.rows}
    print(json.dumps({**out, "policy_version": result.policy_version}))
    return 0
