"""A short seeded chaos run: `kill -9` of the policy server, the reward bridge and the learner
(one each, in a seeded order, at seeded moments) while robots and an operator work; the daemon
restarts each, and no guarantee about the data breaks (DESIGN.md, guarantee 2). Then `kill -9`
of the daemon itself (its children SIGKILLed after it, as systemd does) and a restart: every
report and event acknowledged before is still stored.

Real processes, real SIGKILL, real SQLite: this runs `benchmarks/chaos.py`, whose checks are
the guarantees, and asserts on its figures. Its service starts and restarts JAX processes three
times over (about 90 s on two shared cores), hence `slow`.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHAOS = Path(__file__).parents[2] / "benchmarks" / "chaos.py"


@pytest.mark.slow
def test_kill_9_of_each_role_loses_no_acked_event_duplicates_nothing_and_restores(tmp_path):
    out = subprocess.run(
        [sys.executable, str(CHAOS), "--kills", "3", "--daemon-kills", "1", "--seed", "0",
         "--interval-min-s", "1", "--interval-max-s", "2", "--workdir", str(tmp_path / "chaos")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    f = json.loads(out.stdout.strip().splitlines()[-1])
    per_kill = [line for line in out.stdout.splitlines() if line.startswith("kill ")]
    assert f["kills_by_role"] == {"serve": 1, "bridge": 1, "learn": 1}, per_kill
    # Every kill recovered, and each one's checks held (integrity, events, transitions,
    # the newest version restores, the restarted server serves at least the newest version).
    assert f["survived"] == f["kills"] == 3, per_kill
    assert f["acked_events"] > 0 and f["acked_events_lost"] == 0
    assert f["acked_events_stored_twice"] == 0
    assert f["replies"] > 0 and f["transitions_duplicated"] == 0
    # A killed server loses at most what it replied within one commit interval (+ slack).
    assert f["transitions_lost_outside_window"] == 0
    assert f["max_loss_window_ms"] <= f["commit_window_ms"]
    assert f["daemon_kills"] == f["daemon_kills_survived"] == 1, out.stdout[-2000:]
    # Every report a robot saw acknowledged is stored, with its reward, across every kill.
    assert f["acked_reports"] > 0 and f["acked_reports_lost"] == 0
    assert f["acked_reports_altered"] == 0
    assert f["checkpoints_unrestorable"] == 0 and f["final_integrity"] == "ok"
    assert f["final_version"] is not None and f["daemon_rc"] == 0


@pytest.mark.slow
def test_kill_9_of_postgres_among_the_roles_loses_nothing_a_live_server_replied(tmp_path):
    """The replay in PostgreSQL, whose postmaster is killed too (and restarted 1-3 s later): the
    roles ride the outage out, the server answering robots throughout, and every transition it
    replied, before or during the outage, is stored once."""
    from openpi_rl.replay.pg_cluster import ClusterUnavailable, server_bin

    try:
        server_bin()
    except ClusterUnavailable as e:
        pytest.skip(str(e))
    out = subprocess.run(
        [sys.executable, str(CHAOS), "--backend", "postgres", "--kills", "4", "--daemon-kills",
         "0", "--seed", "0", "--interval-min-s", "1", "--interval-max-s", "2", "--workdir",
         str(tmp_path / "chaos")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    f = json.loads(out.stdout.strip().splitlines()[-1])
    per_kill = [line for line in out.stdout.splitlines() if line.startswith("kill ")]
    assert f["kills_by_role"] == {"serve": 1, "bridge": 1, "learn": 1, "postgres": 1}, per_kill
    assert f["survived"] == f["kills"] == 4, per_kill
    assert f["db_outages"] == 1 and f["roles_restarted_by_db_kill"] == 0
    assert f["db_outage_infer_timeouts"] == 0  # every request for actions answered
    # Nothing a live server replied is lost, though the database died under it.
    assert f["db_held_replies_lost"] == 0 and f["transitions_lost_outside_window"] == 0
    assert f["replies"] > 0 and f["transitions_duplicated"] == 0
    assert f["acked_events"] > 0 and f["acked_events_lost"] == 0
    assert f["acked_events_stored_twice"] == 0
    assert f["acked_reports"] > 0 and f["acked_reports_lost"] == 0
    assert f["acked_reports_altered"] == 0
    assert f["checkpoints_unrestorable"] == 0 and f["final_integrity"] == "ok"
    assert f["daemon_rc"] == 0
