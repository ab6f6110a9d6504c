"""`openpi-rl demo` through the real daemon (server, bridge, learner as child processes):
simulated robots get replies, every reply is a stored transition, the simulated operator's
presses are acknowledged and attached to the replay, a new policy version is published and
served, and the daemon stops cleanly (exit 0)."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

from openpi_rl.replay import ReplayReader, export_lerobot

LEROBOT_CHECK = Path(__file__).parents[1] / "replay" / "lerobot_check.py"


def test_demo_learns_through_the_service_and_the_operator_is_heard(tmp_path, lerobot_python):
    out = subprocess.run(
        [
            sys.executable, "-m", "openpi_rl.cli", "demo", "--minutes", "1", "--until-version",
            "1", "--workdir", str(tmp_path), "--operator-policy.reaction-s", "0.1",
        ],
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    log_path = tmp_path / "service.log"
    log_tail = log_path.read_text()[-4000:] if log_path.exists() else "(no service.log)"
    assert out.returncode == 0, out.stdout + out.stderr[-3000:] + "\nservice.log:\n" + log_tail
    assert "pendant: http://127.0.0.1:" in out.stderr and "#token=" in out.stderr
    assert re.search(r"mean return, first version \(v0, \d+ episodes\): [\d.]+", out.stdout)
    assert "mean return, last 20 episodes:" in out.stdout
    served = int(re.search(r"newest version served: (\d+)", out.stdout)[1])
    assert served >= 1

    # Every served chunk is a stored transition, and later ones came from newer versions.
    reader = ReplayReader(tmp_path / "replay")
    rows = reader.transitions()
    reader.close()
    assert rows and {r.robot_id for r in rows} == {"sim-0", "sim-1"}
    assert max(r.policy_version for r in rows) == served
    assert all(r.reward == 1.0 for r in rows if not r.done)  # each step's env reward, reported
    assert sum(r.done for r in rows) >= 2  # episodes ended (the pole fell)

    # The operator's presses are in the replay, on transitions of the episodes it judged.
    acked = int(re.search(r"operator presses acknowledged: (\d+)", out.stdout)[1])
    attached = int(re.search(r"attached: (\d+)", out.stdout)[1])
    assert acked >= 1 and attached >= 1
    db = sqlite3.connect(tmp_path / "replay" / "replay.sqlite")
    events = db.execute(
        "SELECT e.kind, e.operator, t.episode_id = e.episode_id FROM reward_events e"
        " JOIN transitions t ON t.id = e.transition_id"
    ).fetchall()
    db.close()
    assert len(events) == attached
    assert all(
        kind in ("success", "failure") and op == "demo" and same for kind, op, same in events
    )

    # The daemon's children stopped cleanly.
    log = (tmp_path / "service.log").read_text()
    assert '"event": "daemon.stopped"' in log and '"rc": 0' in log

    # It ends with its learning curve (a PNG) and a video of the newest version (decodable).
    from PIL import Image

    from openpi_rl.eval import read_frames

    curve = re.search(r"learning curve: (\S+)", out.stdout)[1]
    with Image.open(curve) as image:
        assert image.format == "PNG"
    video = re.search(r"video: (\S+/v(\d+)_ep000\.mp4)", out.stdout)
    assert int(video[2]) >= served and len(read_frames(video[1])) >= 2

    # Its replay, exported as a LeRobot dataset, opens in the registry's LeRobot loader with the
    # frame count, fps and shapes declared (tests/replay/test_lerobot.py has the details).
    with ReplayReader(tmp_path / "replay") as reader:
        exported = export_lerobot(reader, tmp_path / "lerobot", fps=50)
    assert exported.frames == len(rows)
    check = [lerobot_python, str(LEROBOT_CHECK), str(tmp_path / "lerobot"), str(tmp_path / "f.npz")]
    check.append("100")  # frames read through the loader, evenly spaced (all are counted)
    done = subprocess.run(check, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert (loaded["frames"], loaded["fps"]) == (len(rows), 50)
    assert loaded["episodes"] == len({(r.robot_id, r.episode_id) for r in rows})
    assert loaded["shapes"]["observation.state"] == [4]  # InvertedPendulum's observation
    assert loaded["shapes"]["action"] == list(rows[0].actions.shape)


def test_a_terminated_demo_stops_its_service(tmp_path):
    """SIGTERM to `openpi-rl demo` (a benchmark stopped, a CI job cancelled) stops the daemon it
    started, which runs in its own session: no server, bridge or learner is left behind."""
    import os
    import signal
    import subprocess
    import sys

    config = tmp_path / "openpi-rl.toml"
    args = ["demo", "--minutes", "5", "--robots", "1", "--workdir", str(tmp_path), "--no-operator"]
    demo = subprocess.Popen(
        [sys.executable, "-m", "openpi_rl.cli", *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for line in demo.stderr:  # the service is up: its roles are running
            if "service ready" in line:
                break
        else:
            raise AssertionError(f"demo ended before the service was ready: {demo.wait()}")
        assert _processes_using(config), "the service's processes run"
        demo.send_signal(signal.SIGTERM)
        demo.wait(90)
    finally:
        demo.kill()
    assert _processes_using(config) == []


def _processes_using(config) -> list[int]:
    """Pids whose command line names `config` (the daemon and its roles)."""
    import os

    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(config).encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids
