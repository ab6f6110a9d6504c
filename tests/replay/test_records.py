"""The replay's own record format: the adder writes the model's arrays and the prompt, readers get
arrays back, and a directory written before the format (robots' request bytes) is migrated or
refused with a message that says what to do."""

import sqlite3

import msgpack
import numpy as np
import pytest

from openpi_rl.replay import (
    ReplayAdder,
    ReplayConfig,
    ReplayFormatError,
    ReplayReader,
    ReplayWriter,
    migrate_main,
    records,
    schema,
)
from openpi_rl_client import wire

ACTIONS = np.arange(8, dtype=np.float32).reshape(4, 2)


def _obs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
        "state": rng.standard_normal(6).astype(np.float32),
    }


def test_an_observation_record_gives_back_the_arrays_and_the_prompt():
    obs = _obs(0)
    got = records.decode_observation(records.encode_observation(obs, "pick up the cube"))
    assert got.prompt == "pick up the cube" and got.arrays.keys() == obs.keys()
    for k, v in obs.items():
        assert got.arrays[k].dtype == v.dtype
        np.testing.assert_array_equal(got.arrays[k], v)
    assert records.decode_observation(records.encode_observation(obs)).prompt is None
    with pytest.raises(ValueError, match="transition 7: observation"):
        records.decode_observation(wire.packb([1, 2]), where="transition 7")


def _add(adder: ReplayAdder, robot: str, episode: str, seed: int, prompt: str | None = None):
    (tid,) = adder.reserve(1)
    step = adder.add(
        tid=tid,
        robot_id=robot,
        episode_id=episode,
        observation=_obs(seed),
        prompt=prompt,
        actions=ACTIONS,
        policy_actions=np.arange(3, dtype=np.int32),
        logp=-1.0,
        value=0.5,
        policy_version=2,
        t_mono=float(seed),
    )
    return tid, step


def test_the_adder_counts_steps_per_robot_and_episode_and_readers_get_arrays(tmp_path):
    with ReplayWriter(ReplayConfig(path=tmp_path, commit_interval_s=0.01)) as writer:
        adder = ReplayAdder(writer, max_robots=2)
        got = [_add(adder, "a", "e1", 0, "stack")[1], _add(adder, "b", "x", 1)[1]]
        got += [_add(adder, "a", "e1", 2, "stack")[1], _add(adder, "a", "e2", 3)[1]]
        adder.restore("c", "old", 41)  # a restarted server counts on from the replay
        got.append(_add(adder, "c", "old", 4)[1])
        got.append(_add(adder, "a", "e2", 5)[1])  # c's restore evicted b (max_robots=2), not a
        got.append(_add(adder, "b", "x", 6)[1])  # b was forgotten: counts from 0 again
        assert got == [0, 0, 1, 0, 41, 1, 0]
    with ReplayReader(tmp_path) as reader:
        rows = reader.transitions()
        assert [r.step for r in rows] == got
        for seed, row in enumerate(rows):
            stored = reader.stored_observation(row)
            assert stored.prompt == ("stack" if row.episode_id == "e1" else None)
            np.testing.assert_array_equal(reader.observation(row)["image"], _obs(seed)["image"])
            np.testing.assert_array_equal(row.actions, ACTIONS)
            assert row.policy_actions.dtype == np.int32


def _old_pack_array(a: np.ndarray | None) -> bytes | None:
    """The array BLOB of format 2 (schema.pack_array before issue 14): str keys."""
    if a is None:
        return None
    a = np.ascontiguousarray(a)
    return msgpack.packb(
        {"__ndarray__": True, "data": a.tobytes(), "dtype": a.dtype.str, "shape": list(a.shape)}
    )


def _old_directory(root) -> dict[int, dict]:
    """A replay directory as format 2 wrote it: each observation payload is the robot's whole
    infer request, the array columns are str-keyed maps. Returns id -> the request sent."""
    requests = {}
    with ReplayWriter(ReplayConfig(path=root, commit_interval_s=0.01)) as writer:
        for i in range(4):
            request = {
                "type": "infer",
                "protocol_version": 1,
                "request_id": f"q{i}",
                "robot_id": "arm",
                "episode_id": "e",
                "observation": _obs(i),
            }
            if i % 2 == 0:
                request["prompt"] = "fold the towel"
            tid = writer.append_transition(
                "arm", "e", i, 1, wire.packb(request), ACTIONS, None, -1.0, 0.0, float(i)
            )
            writer.report(tid, 1.0, False, False, executed_actions=ACTIONS + 1)
            requests[tid] = request
    conn = sqlite3.connect(schema.db_path(root), isolation_level=None)
    for tid, actions, executed in conn.execute(
        "SELECT id, actions, executed_actions FROM transitions"
    ).fetchall():
        conn.execute(
            "UPDATE transitions SET actions = ?, executed_actions = ? WHERE id = ?",
            (
                _old_pack_array(records.decode_array(actions)),
                _old_pack_array(records.decode_array(executed)),
                tid,
            ),
        )
    conn.execute("DELETE FROM meta WHERE key = ?", (records.LEGACY_MAX_ID_KEY,))
    conn.execute("UPDATE schema_version SET version = 2")
    conn.close()
    return requests


def test_an_old_directory_is_refused_by_readers_with_what_to_do(tmp_path):
    _old_directory(tmp_path)
    with pytest.raises(ReplayFormatError) as e:
        ReplayReader(tmp_path)
    message = str(e.value)
    assert str(tmp_path) in message and "format 2" in message and "request" in message
    assert f"openpi-rl replay migrate {tmp_path}" in message


def test_an_old_directory_is_migrated_in_place_and_reads_as_arrays(tmp_path, capsys):
    requests = _old_directory(tmp_path)
    assert migrate_main([str(tmp_path)]) == 0
    assert '"format": 3' in capsys.readouterr().out
    with ReplayWriter(ReplayConfig(path=tmp_path, commit_interval_s=0.01)) as writer:
        new_tid, _ = _add(ReplayAdder(writer), "arm", "e2", 9, "new")  # after the migration
    with ReplayReader(tmp_path) as reader:
        rows = {r.id: r for r in reader.transitions()}
        assert len(rows) == 5
        for tid, request in requests.items():
            stored = reader.stored_observation(rows[tid])
            assert stored.prompt == request.get("prompt")
            assert stored.arrays.keys() == request["observation"].keys()
            for k, v in request["observation"].items():
                np.testing.assert_array_equal(stored.arrays[k], v)
            np.testing.assert_array_equal(rows[tid].actions, ACTIONS)
            np.testing.assert_array_equal(rows[tid].executed_actions, ACTIONS + 1)
            assert rows[tid].reward == 1.0
        stored = reader.stored_observation(rows[new_tid])
        assert stored.prompt == "new"
        np.testing.assert_array_equal(stored.arrays["state"], _obs(9)["state"])


def test_a_directory_from_a_newer_version_is_refused_by_writers_and_readers(tmp_path):
    ReplayWriter(ReplayConfig(path=tmp_path)).close()
    conn = sqlite3.connect(schema.db_path(tmp_path), isolation_level=None)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    for open_ in (ReplayReader, lambda p: ReplayWriter(ReplayConfig(path=p))):
        with pytest.raises(ReplayFormatError, match=r"format 99.*newer openpi-rl") as e:
            open_(tmp_path)
        assert str(tmp_path) in str(e.value)
