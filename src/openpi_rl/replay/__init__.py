"""Replay store: every served action chunk, its rewards, and human feedback events.

SQLite (WAL) holds the index: `transitions`, `episodes`, `reward_events`; observation records
(`records.py`: the model's arrays and the robot's prompt) go to append-only segment files that
rows point at. One `ReplayWriter` (a thread in the policy server, fed by its `ReplayAdder`)
writes; any number of `ReplayReader`s (learner, reward bridge, CLI) read, from any process.
Talks to: the policy server and reward bridge (writers), the learner (reader). Episodes leave
and enter as LeRobot datasets (`lerobot_export.py`, `lerobot_import.py`).
"""

from openpi_rl.replay.adder import ReplayAdder
from openpi_rl.replay.cli import migrate_main, stats_main
from openpi_rl.replay.events_writer import ReplayEventsConfig, ReplayEventsWriter
from openpi_rl.replay.lerobot_export import ExportFilter, ExportResult, export_lerobot
from openpi_rl.replay.lerobot_import import ImportResult, import_lerobot
from openpi_rl.replay.reader import ReplayReader, ReplayStats, TransitionRow
from openpi_rl.replay.records import StoredObservation
from openpi_rl.replay.recovery import RecoveryReport
from openpi_rl.replay.schema import ReplayFormatError
from openpi_rl.replay.segments import CorruptRecord, MissingRecord
from openpi_rl.replay.writer import (
    ReplayClosed,
    ReplayConfig,
    ReplayFull,
    ReplayLocked,
    ReplayWriter,
    RewardEventResult,
)

__all__ = [
    "CorruptRecord",
    "ExportFilter",
    "ExportResult",
    "ImportResult",
    "MissingRecord",
    "RecoveryReport",
    "ReplayAdder",
    "ReplayClosed",
    "ReplayConfig",
    "ReplayEventsConfig",
    "ReplayEventsWriter",
    "ReplayFormatError",
    "ReplayFull",
    "ReplayLocked",
    "ReplayReader",
    "ReplayStats",
    "ReplayWriter",
    "RewardEventResult",
    "StoredObservation",
    "TransitionRow",
    "export_lerobot",
    "import_lerobot",
    "migrate_main",
    "stats_main",
]
