"""The replay's record format: what a stored transition's bytes hold, and the one migration.

Arrays are encoded with the robot's wire codec (`openpi_rl_client.wire`): one layout for the
whole project, the openpi-client msgpack map `{b"__ndarray__": True, b"data": <C-order bytes>,
b"dtype": dtype.str, b"shape": [...]}`. The replay keeps its own *record*, not the wire's
messages: the learner gets arrays back, never a robot's request.

Layout, format 3 (`schema.SCHEMA_VERSION`):

- observation record (a segment file's payload, `segments.py`): a msgpack map
  ``{"observation": {name: ndarray}, "prompt": str}``. ``observation`` holds the model's arrays
  as the server validated them against the model's `obs_spec` (its key names, dtypes and
  shapes; an optional key the robot left out is absent); ``prompt`` is the robot's task text,
  absent when the request had none. Decoded arrays are read-only views of the record's bytes.
- `transitions.actions`, `policy_actions`, `executed_actions` (SQLite BLOBs): one ndarray each
  in the wire layout, or NULL.

Format 2 and older stored the robot's whole msgpack `infer` request as the observation payload
(its `type`, `robot_id`, `request_id`, `observation`, `prompt`, ...) and the array columns as
msgpack maps with str keys. Opening such a directory with a writer migrates it in place
(`migrate_request_payloads`, inside the schema upgrade's transaction): the array columns are
rewritten (small), the segment files are not (they may hold many GB); the newest transition id
at migration is kept in `meta` (`LEGACY_MAX_ID_KEY`) and rows up to it are read as requests.
"""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

import msgpack
import numpy as np

from openpi_rl_client import wire

LEGACY_MAX_ID_KEY = "legacy_request_max_id"
"""meta key: transitions with an id up to this value hold a format-2 request as observation."""


class StoredObservation(NamedTuple):
    """A transition's observation as the model saw it, and the robot's prompt (None: none)."""

    arrays: dict[str, np.ndarray]
    prompt: str | None


def encode_observation(observation: dict[str, np.ndarray], prompt: str | None = None) -> bytes:
    """The observation record of a served chunk (see the module docstring)."""
    record: dict = {"observation": observation}
    if prompt is not None:
        record["prompt"] = prompt
    return wire.packb(record)


def decode_observation(payload: bytes, where: str = "", legacy: bool = False) -> StoredObservation:
    """The arrays and prompt of an observation record; `legacy`: a format-2 payload (the robot's
    request). ValueError naming `where` for bytes that are not a record."""
    try:
        msg = wire.unpackb(payload, max_bytes=max(len(payload), wire.DEFAULT_MAX_BYTES))
    except wire.WireError as e:
        raise ValueError(f"{where}: observation record: {e.message}") from None
    if legacy and isinstance(msg, dict) and "observation" not in msg:
        msg = {"observation": msg}  # the oldest tests' stores: the observation map alone
    obs = msg.get("observation") if isinstance(msg, dict) else None
    if not isinstance(obs, dict):
        got = type(obs if isinstance(msg, dict) else msg).__name__
        raise ValueError(f"{where}: observation: expected a dict of arrays, got {got}")
    arrays = {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in obs.items()}
    prompt = msg.get("prompt")
    return StoredObservation(arrays, prompt if isinstance(prompt, str) else None)


def encode_array(a: np.ndarray | None) -> bytes | None:
    """An array column's BLOB (None stays NULL)."""
    return None if a is None else wire.packb(np.asarray(a))


def decode_array(b: bytes | None) -> np.ndarray | None:
    if b is None:
        return None
    a = wire.unpackb(b, max_bytes=max(len(b), wire.DEFAULT_MAX_BYTES))
    if not isinstance(a, np.ndarray):
        raise ValueError(f"array column: expected an ndarray record, got {type(a).__name__}")
    return a


def _legacy_array(b: bytes | None) -> bytes | None:
    """A format-2 array BLOB (msgpack map with str keys) in the wire layout: its keys become
    the wire's bytes keys and the wire's decoder checks it, so the layout is decoded once."""
    if b is None:
        return None
    d = msgpack.unpackb(b, raw=False)
    if not isinstance(d, dict) or d.get("__ndarray__") is not True:
        return b  # already the wire layout (bytes keys): nothing to convert
    return msgpack.packb({k.encode(): v for k, v in d.items()}, use_bin_type=True)


def migrate_request_payloads(conn: sqlite3.Connection, batch: int = 2000) -> None:
    """Format 2 -> 3, inside the caller's write transaction: rewrite the array columns in the
    wire layout and remember which rows' observation payloads are requests."""
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    (max_id,) = conn.execute("SELECT max(id) FROM transitions").fetchone()
    if max_id is None:
        return
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (LEGACY_MAX_ID_KEY, str(max_id)),
    )
    last = -1
    while True:
        rows = conn.execute(
            "SELECT id, actions, policy_actions, executed_actions FROM transitions"
            " WHERE id > ? ORDER BY id LIMIT ?",
            (last, batch),
        ).fetchall()
        if not rows:
            return
        conn.executemany(
            "UPDATE transitions SET actions = ?, policy_actions = ?, executed_actions = ?"
            " WHERE id = ?",
            [(*(_legacy_array(b) for b in r[1:]), r[0]) for r in rows],
        )
        last = rows[-1][0]
