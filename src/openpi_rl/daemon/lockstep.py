"""Learner processes in step: process 0 decides each turn, the others follow.

With several learner processes (distributed.py) process 0 alone reads the replay, reads the
operator's state, watches the servers, publishes versions and serves metrics; every process
takes part in each update and each save (they are collectives over every device). At the
top of each turn of its loop process 0 sends a `Turn` (`jax.experimental.multihost_utils.
broadcast_one_to_all`): stop, or go on (applying an operator rollback first when it names
one) with or without a batch to train on. The batch travels whole, as npz bytes; each process
then feeds its own columns to the update (`DataParallel.share`). One process: `send` returns
its turn and nothing travels.
"""

from __future__ import annotations

import dataclasses
import io

import jax
import numpy as np

from openpi_rl.daemon.batch import ChunkBatch

_FIELDS = tuple(f for f in ChunkBatch._fields if f not in ("obs", "boot_obs"))


@dataclasses.dataclass(frozen=True)
class Turn:
    """One turn of the learner's loop, as process 0 decided it."""

    stop: bool = False
    rollback: tuple[int, int] | None = None  # (target version, rollback id) to apply first
    batch: ChunkBatch | None = None  # the whole batch to train on (None: no update this turn)
    transitions: int = 0  # chunks in the batch (counted as trained or refused)


class Lockstep:
    """Sends process 0's turns (`send`) and receives them on the others (`receive`)."""

    def __init__(self) -> None:
        self.processes = jax.process_count()
        self.primary = jax.process_index() == 0

    def send(self, turn: Turn) -> Turn:
        """Process 0: hand `turn` to every other process (they wait in `receive`)."""
        if self.processes > 1:
            payload = b"" if turn.batch is None else pack(turn.batch)
            self._exchange(turn, payload)
        return turn

    def receive(self) -> Turn:
        """Another process: the next turn process 0 sends (blocks until it does)."""
        return self._exchange(Turn(), b"")

    def _exchange(self, turn: Turn, payload: bytes) -> Turn:
        from jax.experimental.multihost_utils import broadcast_one_to_all

        rb = turn.rollback or (-1, -1)
        header = np.array([turn.stop, *rb, turn.transitions, len(payload)], np.int32)
        stop, target, rollback_id, transitions, size = (
            int(x) for x in broadcast_one_to_all(header, is_source=self.primary)
        )
        batch = None
        if size:
            # A few padded sizes (powers of two), so the broadcast compiles a few times only.
            padded = np.zeros(max(4096, 1 << (size - 1).bit_length()), np.uint8)
            if self.primary:
                padded[:size] = np.frombuffer(payload, np.uint8)
            got = broadcast_one_to_all(padded, is_source=self.primary)
            batch = unpack(np.asarray(got).astype(np.uint8)[:size].tobytes())
        return Turn(
            stop=bool(stop),
            rollback=None if target < 0 else (target, rollback_id),
            batch=batch,
            transitions=transitions,
        )


def pack(batch: ChunkBatch) -> bytes:
    """A ChunkBatch as npz bytes (`obs/<key>`, `boot_obs/<key>` and one entry per field)."""
    arrays = {f"obs/{k}": v for k, v in batch.obs.items()}
    arrays |= {f"boot_obs/{k}": v for k, v in batch.boot_obs.items()}
    arrays |= {f: getattr(batch, f) for f in _FIELDS}
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def unpack(data: bytes) -> ChunkBatch:
    """`pack`'s inverse."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        obs = {k[4:]: z[k] for k in z.files if k.startswith("obs/")}
        boot = {k[9:]: z[k] for k in z.files if k.startswith("boot_obs/")}
        return ChunkBatch(obs=obs, boot_obs=boot, **{f: z[f] for f in _FIELDS})


__all__ = ["Lockstep", "Turn", "pack", "unpack"]
