"""The operator's decisions on disk: pin, rollback and pause-learning survive restarts.

One small JSON file, `<checkpoint_dir>/operator_state.json`, written by the policy server's
swapper whenever an admin command (or an automatic rollback) changes a decision, and read by:

- the server at start: it serves the pinned version (or the newest one not rolled back from),
  keeps refusing the versions rolled back from, and keeps learning paused;
- the learner at start and between updates: a rollback it has not applied yet makes it train
  on from the rollback target's weights and optimiser state (its version numbers keep
  increasing, so servers tell the new versions from the rejected ones); a pause holds updates;
- checkpoint retention (`VersionCheckpoints`): the pinned version and the rollback target are
  never deleted by `keep_versions`.

Writes are atomic (a temporary file in the same directory, fsync, `os.replace`, fsync of the
directory): a crash leaves the old decision or the new one, never half of either. A file that
does not parse is logged and read as "no decisions", never a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("openpi_rl.operator_state")

STATE_FILE = "operator_state.json"


@dataclasses.dataclass(frozen=True)
class OperatorState:
    pinned: int | None = None  # serve this version; ignore newer notices until unpin
    rejected: tuple[int, ...] = ()  # rolled back from: never followed again
    learning_paused: bool = False
    rollback_target: int | None = None  # the newest rollback's target (the learner resumes it)
    rollback_id: int = 0  # +1 per rollback: the learner applies each one once

    def protected(self) -> set[int]:
        """Versions retention must keep."""
        return {v for v in (self.pinned, self.rollback_target) if v is not None}


def state_path(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / STATE_FILE


def _version(value: Any, key: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key}: expected an int >= 0 or null, got {value!r}")
    return value


def load_state(checkpoint_dir: str | Path) -> OperatorState:
    """The decisions in `checkpoint_dir`; no file (or an unreadable one, logged): none."""
    path = state_path(checkpoint_dir)
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        rejected = raw.get("rejected", [])
        if not isinstance(rejected, list):
            raise ValueError(f"rejected: expected a list, got {rejected!r}")
        paused = raw.get("learning_paused", False)
        if not isinstance(paused, bool):
            raise ValueError(f"learning_paused: expected a bool, got {paused!r}")
        return OperatorState(
            pinned=_version(raw.get("pinned"), "pinned"),
            rejected=tuple(sorted({_version(v, "rejected[]") for v in rejected})),
            learning_paused=paused,
            rollback_target=_version(raw.get("rollback_target"), "rollback_target"),
            rollback_id=_version(raw.get("rollback_id", 0), "rollback_id") or 0,
        )
    except FileNotFoundError:
        return OperatorState()
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        log.error("operator_state.unreadable", path=str(path), error=str(e))
        return OperatorState()


def save_state(checkpoint_dir: str | Path, state: OperatorState) -> None:
    """Write `state` atomically (tmp + fsync + os.replace + fsync of the directory)."""
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(state_path(directory), json.dumps(dataclasses.asdict(state), indent=1) + "\n")


def atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text`: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    finally:
        os.close(fd)


__all__ = ["STATE_FILE", "OperatorState", "atomic_write", "load_state", "save_state", "state_path"]
