"""One bad item never stops the replay writer (issue 12): ids it cannot hold are refused before
they are queued, an item the store refuses is rolled back alone while its batch commits, a
report lands only on its own robot's transition, and a second owner of a directory is refused.
Each runs on both backends (`replay_location`: a directory, a PostgreSQL database) but the last:
a PostgreSQL replay has many writers by design (tests/replay/test_postgres.py)."""

import multiprocessing
import sqlite3

import numpy as np
import pytest

from openpi_rl.replay import (
    ReplayConfig,
    ReplayEventsConfig,
    ReplayLocked,
    ReplayReader,
    ReplayWriter,
)
from openpi_rl.replay.pipeline import ItemRefused


def _append(w: ReplayWriter, robot: str, i: int) -> int:
    obs = np.random.default_rng(i).bytes(100)
    actions = np.full((4, 2), i, np.float32)
    return w.append_transition(robot, "e0", i, 1, obs, actions, None, -1.0, 0.0, float(i))


@pytest.mark.parametrize("tid", [2**63, -1, 0, 2**70])
def test_an_id_the_store_cannot_hold_is_refused_at_the_call_and_the_writer_goes_on(
    replay_location, tid
):
    with ReplayConfig(path=replay_location).create() as w:
        ok = _append(w, "r0", 0)
        with pytest.raises(ValueError, match="transition_id"):
            w.report(tid, 1.0, done=False, truncated=False)
        assert w.report(ok, 2.0, done=True, truncated=False).result(10) is True
    with ReplayReader(replay_location) as r:
        (row,) = r.transitions()
        assert (row.reward, row.done) == (2.0, True)


def _poison(location: str) -> None:
    """A constraint the store enforces (a trigger): the store refuses rows of robot 'poison'."""
    if location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF NEW.robot_id = 'poison' THEN RAISE EXCEPTION 'poisoned row'"
                " USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$"
            )
            conn.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON transitions"
                " FOR EACH ROW EXECUTE FUNCTION poison()"
            )
        return
    conn = sqlite3.connect(f"{location}/replay.sqlite")
    conn.execute(
        "CREATE TRIGGER poison BEFORE INSERT ON transitions WHEN NEW.robot_id = 'poison'"
        " BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
    )
    conn.commit()
    conn.close()


def test_an_item_the_store_refuses_is_rolled_back_alone_and_counted(replay_location):
    loc = replay_location
    with ReplayConfig(path=loc).create() as w:
        _append(w, "r0", 0)
        w.flush()
    _poison(loc)
    with ReplayConfig(path=loc, commit_interval_s=0.5).create() as w:
        good = [_append(w, "r1", 1), _append(w, "poison", 2), _append(w, "r1", 3)]
        fut = w.report(good[0], 1.0, done=False, truncated=False)  # same batch as the poison
        assert fut.result(10) is True
        event = w.add_reward_event("r1", "success", 1.0, wait=True, timeout=10)
        assert w.counters()["items_refused"] == 1
        assert w.counters()["transitions_committed"] == 2
        later = _append(w, "r1", 4)  # the writer is alive
        w.flush()
    with ReplayReader(loc) as r:
        ids = sorted(row.id for row in r.transitions())
        assert ids == sorted([ids[0], good[0], good[2], later])
        assert r.transitions(robot_id="r1")[0].reward == 1.0
        assert event > 0
        assert r.integrity_check() == "ok"  # the refused row's observation went with it


def test_a_report_from_another_robot_matches_nothing(replay_location):
    with ReplayConfig(path=replay_location).create() as w:
        tid = _append(w, "arm-1", 0)
        assert w.report(tid, 5.0, True, False, robot_id="arm-2").result(10) is False
        assert w.report(tid, 1.0, False, False, robot_id="arm-1").result(10) is True
        assert w.counters()["reports_missing"] == 1
    with ReplayReader(replay_location) as r:
        (row,) = r.transitions()
        assert (row.reward, row.done) == (1.0, False)


def test_a_refused_event_fails_its_waiter_only(replay_location):
    with ReplayConfig(path=replay_location).create() as w:
        tid = _append(w, "r0", 0)
        w.flush()
        # An int the store cannot hold reaches the commit (the bridge resolves ids itself).
        bad = w.submit_reward_event("r0", "step", 1.0, transition_id=2**64)
        good = w.submit_reward_event("r0", "step", 1.0, transition_id=tid)
        with pytest.raises(ItemRefused):
            bad.result(10)
        assert good.result(10).transition_id == tid
        assert w.counters()["items_refused"] == 1


def _open_and_report(path: str, queue) -> None:
    try:
        ReplayWriter(ReplayConfig(path=path))
        queue.put("opened")
    except ReplayLocked as e:
        queue.put(str(e))


def test_a_second_writer_on_one_directory_is_refused_with_a_clear_error(tmp_path):
    with ReplayWriter(ReplayConfig(path=tmp_path)):
        with pytest.raises(ReplayLocked, match="in use by another writer"):
            ReplayWriter(ReplayConfig(path=tmp_path))
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=_open_and_report, args=(str(tmp_path), q))
        proc.start()
        msg = q.get(timeout=60)
        proc.join(30)
        assert "in use by another writer" in msg and "one policy server per replay" in msg
        # The bridge's events-only writer shares the directory with its owner.
        ReplayEventsConfig(path=tmp_path).create().close()
    ReplayWriter(ReplayConfig(path=tmp_path)).close()  # released on close
