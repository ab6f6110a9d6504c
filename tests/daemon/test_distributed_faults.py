"""A learner process killed (kill -9): the other stops by itself at once, no version it left
half-written is ever resumed from, and the group restarted resumes from the newest complete
version and publishes the next one (issue 17: a learner process killed)."""

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from learner_helpers import Recorder, learner_config, versions_diff

from openpi_rl.daemon import Learner
from openpi_rl.daemon.distributed import EXIT_PEER_LOST
from openpi_rl.weights.versions import MANIFEST, CorruptVersion, verify_version

LEARNER = Path(__file__).parent / "_distributed_learner.py"
TIMEOUT_S = 15  # the processes' heartbeat timeout (a peer silent this long stops the others)
STOP_S = TIMEOUT_S + 5  # a survivor must have exited by then (at worst: the heartbeat timeout)
PHASE_S = 120  # a phase's processes start, join, compile and publish by then (loaded CI)
TMP = ".orbax-checkpoint-tmp"  # orbax's name for a version being written


class Group:
    """Both processes of a 2-process learner on `root`, their output in `root/<name>.<i>.log`;
    `kill` in a finally kills what is left."""

    def __init__(self, root: Path, name: str, updates: int):
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env.pop("XLA_FLAGS", None)
        # The restarts compile what the first start compiled: read it back from disk.
        env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax-cache")
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.logs = [root / f"{name}.{i}.log" for i in (0, 1)]
        self.procs: list[subprocess.Popen] = []
        try:
            for i, log in enumerate(self.logs):
                args = [str(i), str(port), str(root), str(updates), str(TIMEOUT_S)]
                with open(log, "w") as out:
                    self.procs.append(
                        subprocess.Popen(
                            [sys.executable, str(LEARNER), *args],
                            cwd=root,  # where a core dump of JAX's abort would land
                            env=env,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        )
                    )
        except BaseException:
            self.kill()
            raise

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def until(self, done, what: str, timeout_s: float = PHASE_S) -> None:
        """Poll `done()` every 10 ms; fail when a process exits first or at the deadline."""
        deadline = time.monotonic() + timeout_s
        while not done():
            for i, p in enumerate(self.procs):
                assert p.poll() is None, (
                    f"process {i} exited {p.returncode} before {what}:\n" + (self.log(i)[-3000:])
                )
            assert time.monotonic() < deadline, (
                f"no {what} in {timeout_s} s:\n{self.log(0)[-3000:]}"
            )
            time.sleep(0.01)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _listed(ckpt: Path) -> list[int]:
    """The version directories orbax finished (renamed from their temporary name)."""
    return sorted(int(p.name) for p in ckpt.glob("[0-9]*") if p.name.isdigit())


def _complete(ckpt: Path) -> list[int]:
    """The versions whose files match their manifest: what a learner may resume from."""
    out = []
    for v in _listed(ckpt):
        try:
            verify_version(ckpt / str(v), v)
        except CorruptVersion:
            continue
        out.append(v)
    return out


def _saving(ckpt: Path, after: int) -> bool:
    """Whether a version newer than `after` is being written (orbax's temporary directory)."""
    return any(
        TMP in p.name and int(p.name.split(".")[0]) > after
        for p in ckpt.glob("[0-9]*")
        if p.name.split(".")[0].isdigit()
    )


def _record(root: Path, episodes: range, version: int) -> None:
    """Episodes served by `version` (not stale for a learner at that version) into the replay."""
    recorder = Recorder(root / "replay")
    rng = np.random.default_rng(episodes.start)
    for e in episodes:
        recorder.episode("r0", f"e{e}", 3 + e % 4, rng, version=version)
    recorder.close()


def _resumed(log: str) -> dict[str, int]:
    """Process 0's `learner.resumed` line: version (the next one is this + 1), weights_of (the
    version whose weights and optimizer state it holds), skipped_corrupt."""
    line = next(x for x in log.splitlines() if "learner.resumed " in x)
    return {k: int(v) for k, v in re.findall(r"(version|weights_of|skipped_corrupt)=(\d+)", line)}


def _kill_mid_save(group: Group, ckpt: Path, victim: int) -> tuple[int, float, str, bool]:
    """kill -9 process `victim` once the next version is being written (or after 5 s of
    waiting for one: the replay's data ran out). Returns the survivor's (exit status, seconds
    from the kill to its exit, log, whether a save was cut)."""
    newest = max(_listed(ckpt))
    deadline = time.monotonic() + 5
    while not (cut := _saving(ckpt, newest)) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(group.procs[victim].pid, signal.SIGKILL)
    t0 = time.monotonic()
    survivor = group.procs[1 - victim]
    try:
        rc = survivor.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"process {1 - victim} still runs {STOP_S} s after process {victim} was killed:\n"
            + group.log(1 - victim)[-3000:]
        ) from None
    return rc, time.monotonic() - t0, group.log(1 - victim), cut


def test_a_killed_learner_process_stops_the_other_and_the_group_resumes(tmp_path):
    """Killed in turn: the follower (process 1), then, restarted, process 0; each time mid-save
    when the timing allows. The survivor exits by itself at once, nonzero, saying why; the
    group restarted resumes from the newest version that verifies, numbers its versions on and,
    the last time, publishes the version a 1-device learner makes from the same state."""
    ckpt = tmp_path / "ckpt"
    stops = []
    phases = [time.monotonic()]

    # 1. The follower killed: process 0's collective fails; it logs peer_lost, exits 75.
    _record(tmp_path, range(16), version=0)  # 8 segments per update: 2 updates
    group = Group(tmp_path, "first", updates=0)
    try:
        group.until(lambda: (ckpt / "1" / MANIFEST).exists(), "version 1")
        rc, seconds, log, cut = _kill_mid_save(group, ckpt, victim=1)
    finally:
        group.kill()
    assert rc == EXIT_PEER_LOST and "learner.peer_lost" in log, (rc, log[-3000:])
    stops.append((1, round(seconds, 2), cut))
    phases.append(time.monotonic())
    listed, complete = _listed(ckpt), _complete(ckpt)
    assert complete and complete[-1] >= 1, (listed, complete)

    # 2. Restarted: it resumes from the newest complete version (a newer one, cut short before
    # its manifest, is skipped and its number not reused) and numbers on. Then process 0 killed.
    _record(tmp_path, range(16, 32), version=listed[-1])
    group = Group(tmp_path, "second", updates=0)
    try:
        after = ckpt / str(listed[-1] + 1) / MANIFEST  # written once the version is complete
        group.until(after.exists, "a version after the restart")
        resumed = _resumed(group.log(0))
        rc, seconds, log, cut = _kill_mid_save(group, ckpt, victim=0)
    finally:
        group.kill()
    assert resumed == {
        "version": listed[-1],
        "weights_of": complete[-1],
        "skipped_corrupt": len(listed) - listed.index(complete[-1]) - 1,
    }, (resumed, listed, complete)
    assert min(v for v in _complete(ckpt) if v > complete[-1]) == listed[-1] + 1
    # Process 1 logs peer_lost and exits 75 when its collective fails first; when JAX's client
    # sees the coordination service (process 0's) gone first, JAX aborts it, saying so.
    ours = rc == EXIT_PEER_LOST and "learner.peer_lost" in log
    jaxs = rc == -signal.SIGABRT and "JAX distributed service detected fatal errors" in log
    assert ours or jaxs, (rc, log[-3000:])
    stops.append((0, round(seconds, 2), cut))
    phases.append(time.monotonic())
    listed, complete = _listed(ckpt), _complete(ckpt)

    # 3. Restarted again beside a 1-device learner on a copy of the same replay and versions:
    # both resume from the newest complete version and publish the same next version.
    _record(tmp_path, range(32, 40), version=listed[-1])
    alone = tmp_path / "alone"
    for part in ("replay", "ckpt"):
        shutil.copytree(tmp_path / part, alone / part)
    group = Group(tmp_path, "third", updates=1)
    try:
        for p in group.procs:  # process 0 stops after 1 update, process 1 with it
            p.wait(timeout=PHASE_S)
    finally:
        group.kill()
    phases.append(time.monotonic())
    phases = [round(b - a, 1) for a, b in itertools.pairwise(phases)]
    assert [p.returncode for p in group.procs] == [0, 0], [group.log(i)[-2000:] for i in (0, 1)]
    assert _resumed(group.log(0))["weights_of"] == complete[-1]
    assert max(_complete(ckpt)) == listed[-1] + 1
    learner = Learner(learner_config(alone), devices=jax.devices()[:1])
    try:
        assert learner.step().version == listed[-1] + 1
    finally:
        learner.close()
    new = str(listed[-1] + 1)
    assert versions_diff(ckpt / new, alone / "ckpt" / new) <= 1e-5
    print("killed, survivor's seconds to exit, save cut:", stops, "phases:", phases)
