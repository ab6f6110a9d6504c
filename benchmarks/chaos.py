"""Chaos run: `kill -9` the service's processes at random moments while it works, and check
after every kill that no guarantee about the data broke (DESIGN.md, guarantee 2).

    python benchmarks/chaos.py              # 100 kills, 3-6 s apart after each recovery, then
                                            # 5 kills of the daemon itself
    python benchmarks/chaos.py --quick      # 5 kills and 1 of the daemon (smoke)
    python benchmarks/chaos.py --backend postgres --quick   # the replay in PostgreSQL, whose
                                            # postmaster is killed too

The workload is the demo's: `openpi-rl daemon` (policy server, reward bridge, learner as its
children), 4 simulated MuJoCo robots on `PolicyClient`s and a simulated operator at the
pendant's WebSocket. A seeded RNG picks the victim (server, bridge and learner, and PostgreSQL
with `--backend postgres`, in shuffled rounds that hit each once) and the moment; the daemon
restarts a role.
After each kill, once every role is ready again:

- the store: `ReplayReader.integrity_check()` says ok (SQLite: `PRAGMA integrity_check`;
  PostgreSQL: every transition has its observation);
- acknowledged reward events: every idempotency key the bridge acknowledged to the operator is
  in `reward_events` exactly once;
- transitions: every transition id replied to a robot is unique and stored, except those a
  killed server replied within one commit interval (plus `--slack-s` of scheduling) before it
  died. Ids carry their server's boot epoch (`id >> SEQ_BITS`), so a missing id is charged to
  the server run that handed it out;
- after a learner kill: the newest complete version on disk restores (`restore_version`) into
  a freshly built ActorCritic;
- after a server kill: the restarted server's first reply carries at least the newest version
  that was on disk when it was killed (it starts from `swap.checkpoint_dir`).

- acknowledged reports: every report a robot saw answered {"ok": true} is in its transition
  (the server acknowledges a report once committed): the transition is stored with that reward
  and its done/truncated flags (`acked_reports_lost`, `acked_reports_altered`).

Then `--daemon-kills` times the daemon itself: `kill -9` of the `openpi-rl daemon` process
while robots infer and report. Its children run in their own sessions (the supervisor's
`start_new_session`), but each asked the kernel for SIGTERM on the daemon's death
(`PR_SET_PDEATHSIG`) and stops as on any SIGTERM; `orphans_after_daemon_kill` counts the roles
still running `--orphan-watch-s` later (0 expected: a learner mid-update may take longer),
`replies_from_orphans` what robots were served meanwhile. Under systemd (`KillMode=mixed`) the
unit's remaining processes get SIGKILL once its main process is gone; the run does that
(SIGKILL to each child's process group, if any is left), starts the daemon again, and once
every role is ready checks all of the above (a killed server's commit interval as for a
server kill).

Robot requests that fail while the server restarts are counted as `robot_failures`: the
guarantees are about data, not availability. The last line is one JSON object.

`--backend postgres` puts the replay in a throw-away PostgreSQL server (`LocalCluster`, with a
real server's durability: its default options, fsync on) and adds the database to the victims:
`kill -9` of the postmaster, then, after an outage of `--pg-outage-min-s`..`--pg-outage-max-s`,
its restart (crash recovery), as an operator's systemd would. The roles are not restarted: their
writers keep what they were handed, reconnect and commit it. So after a database kill:
- no role was restarted (`roles_restarted_by_db_kill`), and the server kept answering robots'
  requests for actions throughout (`db_outage_infer_timeouts`: none got no answer within the
  client's timeout and retries); once its bounded queue is full it answers `overloaded`
  (`db_outage_overloaded`). A report is acknowledged once committed, so one sent during the
  outage is answered after it, often past the robot's timeout (`db_outage_report_timeouts`);
- every transition a server replied is stored: those not yet committed at the kill
  (`db_pending_at_kill`) and those replied during the outage (`db_outage_replies`) included
  (`db_held_replies_lost`): no commit-interval allowance, since no server died;
- and the checks above, once every role is ready and a report on a transition replied after
  the restart is acknowledged (the writer commits in order: whatever it was handed before has
  landed by then).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

from openpi_rl.demo import DaemonProcess, Episode, OperatorPolicy, SimOperator, write_demo_config
from openpi_rl.replay import store
from openpi_rl.replay.writer import SEQ_BITS
from openpi_rl.service.config import ServiceFile
from openpi_rl.train.envs import EnvBatch
from openpi_rl_client import PolicyClient, protocol

ROLES = ("serve", "bridge", "learn")
DATABASE = "postgres"  # the victim that is the PostgreSQL server (--backend postgres)
# SIGUSR1: finish the kill in progress, then stop and report on the kills done so far.
_FINISH = threading.Event()


@dataclasses.dataclass(frozen=True)
class Args:
    kills: int = 100
    interval_min_s: float = 3.0
    """After the service recovered from a kill, the next one comes this long later at least..."""
    interval_max_s: float = 6.0
    """... and at most."""
    robots: int = 4
    infer_only_robots: int | None = None
    """Robots that never report (openpi's clients do not): they ask for actions at `hz` without
    waiting on a report's acknowledgement, so a database outage holds their transitions in the
    server's memory. None: 2 with `--backend postgres`, 0 with sqlite."""
    hz: float = 20.0
    """Chunks per second per robot."""
    seed: int = 0
    recover_timeout_s: float = 120.0
    """A kill the service has not recovered from within this long is not survived."""
    slack_s: float = 0.05
    """Scheduling slack added to the commit interval when judging a killed server's losses."""
    daemon_kills: int = 5
    """After the role kills: `kill -9` of the daemon itself, each followed by a restart."""
    orphan_watch_s: float = 2.0
    """How long after a daemon kill its children are watched before they get SIGKILL."""
    restart_beside_orphans: bool = False
    """Start the new daemon while the killed one's children still run (as by hand, outside
    systemd), watch it 3 x `orphan_watch_s`, then SIGKILL the orphans."""
    backend: Literal["sqlite", "postgres"] = "sqlite"
    """Where the replay lives. postgres: a throw-away PostgreSQL server, itself a victim."""
    pg_outage_min_s: float = 1.0
    """A killed postmaster is restarted this long after its kill at least..."""
    pg_outage_max_s: float = 3.0
    """... and at most."""
    quick: bool = False
    """5 kills, 1 of the daemon."""
    workdir: str | None = None
    keep: bool = False


# -- the workload


@dataclasses.dataclass
class Reply:
    transition_id: int
    t: float  # time.monotonic() when the reply arrived
    version: int
    robot_id: str


class Robots:
    """Simulated robots (threads) that record every reply; failures counted, never fatal."""

    def __init__(
        self,
        endpoint: str,
        n: int,
        hz: float,
        seed: int,
        rescale: bool,
        operator,
        infer_only: int = 0,
    ):
        """`n` robots that report each chunk (their operator judges them) and `infer_only`
        ones that never report."""
        self.endpoint, self.hz, self.rescale, self.operator = endpoint, hz, rescale, operator
        self.replies: list[Reply] = []
        # (transition id, reward, done, truncated, its reply's time) of every report answered
        # {"ok": true}
        self.acked: list[tuple[int, float, bool, bool, float]] = []
        self.failures = 0
        self.errors: list[tuple[float, str]] = []  # (time, "infer|report CODE|timeout")
        self.latencies_ms: list[float] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(f"sim-{i}", seed + 1000 * i, True))
            for i in range(n)
        ] + [
            threading.Thread(target=self._run, args=(f"infer-{i}", seed + 1000 * (n + i), False))
            for i in range(infer_only)
        ]
        for t in self.threads:
            t.daemon = True

    def start(self) -> Robots:
        for t in self.threads:
            t.start()
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def snapshot(self) -> list[Reply]:
        with self._lock:
            return list(self.replies)

    def acked_reports(self) -> list[tuple[int, float, bool, bool, float]]:
        with self._lock:
            return list(self.acked)

    def failed(self, kind: str, e: Exception) -> None:
        code = e.code if isinstance(e, protocol.ProtocolError) else "timeout"
        with self._lock:
            self.failures += 1
            self.errors.append((time.monotonic(), f"{kind} {code}"))

    def errors_between(self, t0: float, t1: float) -> dict[str, int]:
        """Failed requests between two times by message and code ("infer overloaded"; "report
        timeout": no answer within the client's timeout and retries)."""
        with self._lock:
            codes = [code for t, code in self.errors if t0 <= t < t1]
        return {c: codes.count(c) for c in sorted(set(codes))}

    def _run(self, robot_id: str, seed: int, report: bool) -> None:
        env = EnvBatch("InvertedPendulum-v5", 1, seed)
        period, next_tick = 1.0 / self.hz, time.monotonic()
        episode = f"{robot_id}-{uuid.uuid4().hex[:12]}"
        served = 0
        try:
            with PolicyClient(self.endpoint, robot_id, timeout_s=1.0, retries=2) as client:
                while not self.stop.is_set():
                    next_tick = max(next_tick + period, time.monotonic())
                    self.stop.wait(max(0.0, next_tick - time.monotonic()))
                    t0 = time.perf_counter()
                    try:
                        out = client.infer({"state": env.obs[0]}, episode_id=episode)
                    except (TimeoutError, protocol.ProtocolError) as e:
                        self.failed("infer", e)
                        continue
                    now = time.monotonic()
                    with self._lock:
                        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                        self.replies.append(
                            Reply(out.transition_id, now, out.policy_version, robot_id)
                        )
                    step, _ = env.step(out.actions[None], rescale=self.rescale)
                    term, trunc = bool(step.terminated[0]), bool(step.truncated[0])
                    reward = float(step.rewards[0])
                    if not report:  # the env resets itself at an episode's end
                        if step.finished:
                            episode = f"{robot_id}-{uuid.uuid4().hex[:12]}"
                        continue
                    try:
                        ack = client.report(
                            out.transition_id, reward=reward, done=term, truncated=trunc
                        )
                    except (TimeoutError, protocol.ProtocolError) as e:
                        self.failed("report", e)
                    else:
                        if ack.get("ok") is True:
                            with self._lock:
                                self.acked.append((out.transition_id, reward, term, trunc, now))
                    served += 1
                    if self.operator is not None and (step.finished or served % 20 == 0):
                        # The operator judges the robot every second or so (a failure press on
                        # a running episode is still a press): a steady stream of events to
                        # check, however long the episodes get as the policy learns.
                        v = out.policy_version
                        ep = Episode(robot_id, episode, 0.0, 1, v, v, True, time.monotonic(), 0)
                        self.operator.saw(ep)
                    if step.finished:
                        episode = f"{robot_id}-{uuid.uuid4().hex[:12]}"
        finally:
            env.close()


class Service:
    """The daemon plus what the checks need: its children's pids, readiness, paths."""

    def __init__(
        self,
        workdir: Path,
        robots: int,
        seed: int,
        daemon_extra: str = "",
        serve_extra: str = "",
        replay_url: str | None = None,
    ):
        """`replay_url`: a PostgreSQL database for the replay (else a directory in `workdir`)."""
        token = secrets.token_urlsafe(16)
        path = write_demo_config(workdir, robots, token, seed, pendant_port=0)
        text = path.read_text()
        if replay_url is not None:
            line = f'replay_dir = "{workdir / "replay"}"\n'
            text = text.replace(line, f"replay_dir = {json.dumps(replay_url)}\n", 1)
        # Restart at once: kills seconds apart would otherwise climb the crash back-off.
        extra = "restart_backoff_s = 0.2\nrestart_backoff_max_s = 1.0\n" + daemon_extra
        text = text.replace("[daemon]\n", "[daemon]\n" + extra, 1)
        path.write_text(text.replace("[serve]\n", "[serve]\n" + serve_extra, 1))
        self.file = ServiceFile.load(path)
        self.serve = self.file.role_config("serve")
        self.learn = self.file.role_config("learn")
        self.daemon = DaemonProcess(path, workdir / "service.log")
        self.service = self.daemon.service
        self.replay_dir = self.serve.replay_dir  # a directory or a postgresql:// URL
        self.checkpoint_dir = Path(self.learn.checkpoint_dir)
        self.healthz = self.service.pendant_ws.replace("ws://", "http://").replace(
            "/pendant", "/healthz"
        )
        self.learner_metrics = f"http://127.0.0.1:{self.learn.metrics_port}/metrics"

    def start(self, timeout_s: float = 300.0) -> None:
        self.daemon.start()
        self.daemon.wait_ready(timeout_s)

    def children(self) -> dict[str, int]:
        """role -> pid of the daemon's live children (from /proc)."""
        return {role: pid for pid, role in _children(self.daemon.proc.pid).items()}

    def ready(self, role: str) -> bool:
        try:
            if role == "serve":
                with PolicyClient(self.service.endpoint, "chaos-health", 0.5, retries=0) as c:
                    return c.health().get("status") == "ready"
            url = self.healthz if role == "bridge" else self.learner_metrics
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.status == 200
        except (TimeoutError, OSError, protocol.ProtocolError):
            return False

    def wait_recovered(self, role: str, old_pid: int, timeout_s: float) -> float | None:
        """Seconds until `role` runs under a new pid and every role is ready; None: timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.daemon.proc.poll() is not None:
                return None
            pids = self.children()
            if pids.get(role) not in (None, old_pid) and all(self.ready(r) for r in ROLES):
                return time.monotonic() - t0
            time.sleep(0.1)
        return None


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> dict[int, str]:
    """pid -> role of `pid`'s child processes that run `openpi_rl.cli ROLE`."""
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            try:
                argv = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [a.decode(errors="replace") for a in argv]
            if "openpi_rl.cli" in args:
                role = args[args.index("openpi_rl.cli") + 1]
                if role in ROLES:
                    out[kid] = role
    return out


# -- the checks


def newest_version(checkpoint_dir: Path) -> int | None:
    """The newest complete version: orbax renames a step's temporary directory to its number
    only when the step is complete."""
    steps = [int(p.name) for p in checkpoint_dir.glob("*") if p.name.isdigit() and p.is_dir()]
    return max(steps, default=None)


class Checker:
    def __init__(self, svc: Service, slack_s: float):
        from openpi_rl.models.choice import build_actor_critic

        self.svc = svc
        self.window_s = svc.serve.commit_interval_s + slack_s
        learn = svc.learn
        self.ac = build_actor_critic(learn.model, learn.value_hidden, learn.seed + 1)
        self.server_kills: dict[int, float] = {}  # boot epoch -> monotonic time of its kill
        self.checked_upto = 0  # replies[:checked_upto] were accounted for
        self.lost_in_window = 0
        self.lost_outside: list[int] = []
        self.max_loss_window_ms = 0.0
        self.seen_ids: set[int] = set()
        self.duplicated = 0

    def integrity(self) -> str:
        from openpi_rl.replay import ReplayReader

        with ReplayReader(self.svc.replay_dir) as r:
            return r.integrity_check()

    def _db(self) -> store.Connection:
        return store.connect(self.svc.replay_dir)

    def events(self, acks: list[dict]) -> tuple[int, int]:
        """(acked keys missing from reward_events, acked keys stored more than once)."""
        keys = sorted({a["idempotency_key"] for a in acks})
        counts: dict[str, int] = {}
        conn = self._db()
        try:
            for i in range(0, len(keys), 500):
                part = keys[i : i + 500]
                q = ",".join("?" * len(part))
                for k, n in conn.execute(
                    f"SELECT idempotency_key, count(*) FROM reward_events "
                    f"WHERE idempotency_key IN ({q}) GROUP BY idempotency_key",
                    part,
                ):
                    counts[k] = n
        finally:
            conn.close()
        return sum(1 for k in keys if k not in counts), sum(1 for n in counts.values() if n > 1)

    def reports(self, acked: list[tuple[int, float, bool, bool, float]]) -> tuple[int, int]:
        """(acknowledged reports whose transition is missing, ones whose transition differs:
        its reward is not the sum of the acknowledged rewards, or a flag reported is unset)."""
        want: dict[int, list] = {}
        for tid, reward, done, trunc, _ in acked:
            w = want.setdefault(tid, [0.0, False, False])
            w[0] += reward
            w[1] |= done
            w[2] |= trunc
        ids = sorted(want)
        rows: dict[int, tuple] = {}
        conn = self._db()
        try:
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                q = ",".join("?" * len(part))
                for tid, *row in conn.execute(
                    f"SELECT id, reward, done, truncated FROM transitions WHERE id IN ({q})", part
                ):
                    rows[tid] = tuple(row)
        finally:
            conn.close()
        lost = sum(1 for tid in ids if tid not in rows)
        altered = 0
        for tid, (reward, done, trunc) in want.items():
            row = rows.get(tid)
            if row is not None and (
                abs(row[0] - reward) > 1e-9 * max(1.0, abs(reward))
                or (done and not row[1])
                or (trunc and not row[2])
            ):
                altered += 1
                if altered <= 3:
                    print(f"  report of {tid}: acked {(reward, done, trunc)}, stored {row}")
        return lost, altered

    def stored(self, ids: list[int]) -> set[int]:
        """Those of `ids` whose transition is in the replay."""
        stored: set[int] = set()
        conn = self._db()
        try:
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                q = ",".join("?" * len(part))
                stored.update(
                    x
                    for (x,) in conn.execute(f"SELECT id FROM transitions WHERE id IN ({q})", part)
                )
        finally:
            conn.close()
        return stored

    def transitions(self, replies: list[Reply], upto: float) -> tuple[int, int, int]:
        """Account for the replies that arrived before `upto` and were not yet checked:
        (replies checked, lost within a killed server's commit interval, lost otherwise)."""
        new = [r for r in replies[self.checked_upto :] if r.t < upto]
        self.checked_upto += len(new)
        for r in new:
            if r.transition_id in self.seen_ids:
                self.duplicated += 1
            self.seen_ids.add(r.transition_id)
        stored = self.stored([r.transition_id for r in new])
        in_window = outside = 0
        for r in new:
            if r.transition_id in stored:
                continue
            t_kill = self.server_kills.get(r.transition_id >> SEQ_BITS)
            # A reply that left the server before its kill may arrive just after it.
            if t_kill is not None and r.t >= t_kill - self.window_s:
                in_window += 1
                self.max_loss_window_ms = max(self.max_loss_window_ms, (t_kill - r.t) * 1e3)
            else:
                outside += 1
                self.lost_outside.append(r.transition_id)
        self.lost_in_window += in_window
        return len(new), in_window, outside

    def checkpoint(self) -> tuple[int | None, bool]:
        """(newest complete version, whether it restores into a fresh ActorCritic)."""
        from openpi_rl.weights.versions import restore_version

        v = newest_version(self.svc.checkpoint_dir)
        if v is None:
            return None, False
        try:
            state = restore_version(self.svc.checkpoint_dir / str(v), self.ac)
            leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(state)]
            return v, bool(leaves) and all(np.isfinite(x).all() for x in leaves)
        except Exception as e:  # reported: the guarantee is that this never happens
            print(f"  restore of version {v} failed: {e!r:.300}", flush=True)
            return v, False


def first_reply_after(robots: Robots, epoch: int, timeout_s: float) -> Reply | None:
    """The first reply from a server run later than boot epoch `epoch` (every writer that
    opens the store, the bridge's included, takes an epoch: the next server's may skip some)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for r in robots.snapshot()[-400:]:
            if r.transition_id >> SEQ_BITS > epoch:
                return r
        time.sleep(0.05)
    return None


# -- the run


@dataclasses.dataclass
class DbOutage:
    """One `kill -9` of the postmaster, its restart, and what robots saw meanwhile."""

    pid: int | None
    outage_s: float  # from the kill to the restarted server accepting connections
    recovered_s: float | None  # from the restart until robots' reports are acknowledged again
    upto: float  # every reply that arrived before this was handed over before an acked report
    pending: set[int]  # ids replied but not in the database just before the kill
    held: set[int]  # those and the ids replied since (the outage's: in the writer's memory only)
    errors: dict[str, int]  # failed requests by code from the kill until recovered
    restarted: list[str]  # roles the daemon restarted meanwhile (none expected)


def kill_database(
    svc: Service, cluster, robots: Robots, checker: Checker, outage_s: float, timeout_s: float
) -> DbOutage:
    """`kill -9` of the postmaster; `outage_s` later its restart (crash recovery); then wait
    until every role is ready and a report replied after the restart is acknowledged."""
    pids = svc.children()
    pid = cluster.postmaster_pid()
    t_look = time.monotonic()
    recent = [r.transition_id for r in robots.snapshot()[-50:]]
    pending = set(recent) - checker.stored(recent)  # not committed a moment before the kill
    t_kill = time.monotonic()
    cluster.kill()
    time.sleep(max(0.0, outage_s - (time.monotonic() - t_kill)))
    cluster.restart()
    t_up = time.monotonic()
    recovered_s = None
    upto = t_kill
    while time.monotonic() - t_up < timeout_s and svc.daemon.proc.poll() is None:
        # The writer commits in order: once a report on a transition replied at `t` is
        # acknowledged, every row handed over before `t` is committed.
        after = [a[4] for a in robots.acked_reports()[-500:] if a[4] >= t_up]
        if after and all(svc.ready(r) for r in ROLES):
            recovered_s, upto = time.monotonic() - t_up, min(after)
            break
        time.sleep(0.1)
    t_end = time.monotonic()
    now = svc.children()
    return DbOutage(
        pid=pid,
        outage_s=t_up - t_kill,
        recovered_s=recovered_s,
        upto=upto,
        pending=pending,
        held=pending | {r.transition_id for r in robots.snapshot() if t_look <= r.t < t_up},
        errors=robots.errors_between(t_kill, t_end),
        restarted=sorted(r for r in ROLES if now.get(r) != pids.get(r)),
    )


def kill_daemon(
    svc: Service, robots: Robots, operator, checker: Checker, args: Args, i: int, n: int
) -> tuple[bool, int, int]:
    """`kill -9` of the daemon; watch its children; SIGKILL them as systemd would; start the
    daemon again. Returns (recovered with every check holding, roles still running
    `orphan_watch_s` after the kill, replies robots got meanwhile)."""
    pids = svc.children()
    dpid = svc.daemon.proc.pid
    newest_before = newest_version(svc.checkpoint_dir)
    t_kill = time.monotonic()
    os.kill(dpid, signal.SIGKILL)
    svc.daemon.proc.wait()
    time.sleep(args.orphan_watch_s)
    orphans = {role: pid for role, pid in pids.items() if _running(pid)}
    served = sum(1 for r in robots.snapshot() if r.t > t_kill)
    last = robots.snapshot()[-1:]
    epoch = last[0].transition_id >> SEQ_BITS if last else None
    beside = ""
    t0 = time.monotonic()
    if args.restart_beside_orphans:
        svc.daemon.start()
        time.sleep(3 * args.orphan_watch_s)
        ran = svc.children()
        up = "up" if svc.daemon.proc.poll() is None else f"exited {svc.daemon.proc.returncode}"
        beside = f"; a daemon started beside them: {up}, its children running {sorted(ran)}"
        last = robots.snapshot()[-1:]
        epoch = last[0].transition_id >> SEQ_BITS if last else None
    # systemd, KillMode=mixed: once the main process is gone, SIGKILL to the rest of the unit.
    t_server_kill = time.monotonic()
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    if epoch is not None and "serve" in pids:
        checker.server_kills[epoch] = t_server_kill
    deadline = time.monotonic() + 10
    while any(_running(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    problems = []
    recovered_s: float | None = None
    try:
        if not args.restart_beside_orphans:
            svc.daemon.start()
        svc.daemon.wait_ready(args.recover_timeout_s)
        # Every role under a new pid and ready (beside orphans, the new daemon's own children
        # may still be in their restart back-off when the orphans die).
        while time.monotonic() - t0 < args.recover_timeout_s:
            new = svc.children()
            fresh = all(new.get(r) not in (None, pids.get(r)) for r in ROLES)
            if fresh and all(svc.ready(r) for r in ROLES):
                recovered_s = time.monotonic() - t0
                break
            time.sleep(0.1)
        else:
            problems.append(f"children not restarted: {pids} -> {svc.children()}")
    except (RuntimeError, TimeoutError) as e:
        problems.append(f"not recovered: {e}")
    integrity = checker.integrity()
    if integrity != "ok":
        problems.append(f"integrity {integrity!r}")
    lost, dup = checker.events(list(operator.acks))
    if lost or dup:
        problems.append(f"acked events lost {lost}, stored twice {dup}")
    n_checked, in_window, outside = checker.transitions(robots.snapshot(), t_server_kill)
    if outside:
        problems.append(f"transitions lost outside a commit interval {outside}")
    r_lost, r_altered = checker.reports(robots.acked_reports())
    if r_lost or r_altered:
        problems.append(f"acked reports lost {r_lost}, altered {r_altered}")
    got = None
    if recovered_s is not None and epoch is not None:
        first = first_reply_after(robots, epoch, 15.0)
        got = None if first is None else first.version
        if got is None or (newest_before is not None and got < newest_before):
            problems.append(f"served v{got} < newest v{newest_before}")
    line = (
        f"daemon kill {i + 1}/{n} pid {dpid}: children still running after "
        f"{args.orphan_watch_s:g} s {sorted(orphans) or 'none'} ({served} replies served "
        f"meanwhile){beside}; orphans SIGKILLed; restarted "
        f"{'-' if recovered_s is None else f'{recovered_s:.1f} s'} | integrity {integrity} | "
        f"acked events {len(operator.acks)} lost {lost} | acked reports "
        f"{len(robots.acked_reports())} lost {r_lost} altered {r_altered} | replies checked "
        f"{n_checked}, lost in window {in_window}, outside {outside} | newest on disk "
        f"{newest_before}, first reply after restart v{got}"
    )
    if problems:
        line += " | FAILED: " + "; ".join(problems)
    print(line, flush=True)
    return not problems, len(orphans), served


def run(args: Args) -> dict:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="openpi-rl-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.backend == "sqlite":
        figures = run_service(args, workdir, None)
    else:
        from openpi_rl.replay.pg_cluster import LocalCluster

        # options=(): PostgreSQL's defaults (fsync on), the durability of a real server.
        cluster = LocalCluster(options=()).start()
        print(f"chaos: PostgreSQL in {cluster.root}", file=sys.stderr, flush=True)
        try:
            figures = run_service(args, workdir, cluster)
        finally:
            cluster.stop()
    if args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"chaos: work directory {workdir}", file=sys.stderr)
    return figures


def run_service(args: Args, workdir: Path, cluster) -> dict:
    """The kills and checks on a service whose replay is in `workdir` or, given a `LocalCluster`,
    in a database of it (then its postmaster is a victim too)."""
    kills = 5 if args.quick and args.kills == Args.kills else args.kills
    daemon_kills = 1 if args.quick and args.daemon_kills == Args.daemon_kills else args.daemon_kills
    rng = random.Random(args.seed)
    url = None if cluster is None else cluster.create_database("replay")
    victims = ROLES if cluster is None else (*ROLES, DATABASE)
    svc = Service(workdir, args.robots, args.seed, replay_url=url)
    t_start = time.monotonic()
    print(f"chaos: starting the service in {workdir}", file=sys.stderr, flush=True)
    svc.start()
    checker = Checker(svc, args.slack_s)
    s = svc.service
    operator = SimOperator(s.pendant_ws, s.operator_token, OperatorPolicy(press_hz=4.0))
    operator.start()
    rescale = bool(getattr(s.model, "normalized_actions", False))
    infer_only = args.infer_only_robots
    if infer_only is None:
        infer_only = 0 if cluster is None else 2
    robots = Robots(
        s.endpoint, args.robots, args.hz, args.seed, rescale, operator, infer_only
    ).start()
    survived = acked_lost = unrestorable = 0
    by_role = dict.fromkeys(victims, 0)
    outages: list[DbOutage] = []
    order: list[str] = []
    daemon_rc = None
    done = 0
    daemon_survived = orphans_total = orphan_replies = daemon_done = 0
    try:
        for i in range(kills):
            if _FINISH.is_set():
                print(f"chaos: SIGUSR1: stopping after {done} of {kills} kills", flush=True)
                kills = done
                break
            if not order:
                order = list(victims)
                rng.shuffle(order)
            role = order.pop()
            if _FINISH.wait(rng.uniform(args.interval_min_s, args.interval_max_s)):
                continue  # stopping: reported at the top of the loop
            pids = svc.children()
            if role != DATABASE and role not in pids:
                print(f"kill {i + 1}: no {role} process to kill", flush=True)
                break
            newest_before = newest_version(svc.checkpoint_dir)
            epoch = None
            if role == "serve":
                last = robots.snapshot()[-1:]
                epoch = last[0].transition_id >> SEQ_BITS if last else None
            problems = []
            by_role[role] += 1
            if role == DATABASE:
                outage_s = rng.uniform(args.pg_outage_min_s, args.pg_outage_max_s)
                db = kill_database(svc, cluster, robots, checker, outage_s, args.recover_timeout_s)
                outages.append(db)
                pid, recovered_s, upto = db.pid, db.recovered_s, db.upto
                if db.restarted:
                    problems.append(f"roles restarted during the outage {db.restarted}")
                if db.errors.get("infer timeout"):
                    problems.append(f"infer requests unanswered {db.errors['infer timeout']}")
            else:
                pid, upto = pids[role], time.monotonic()
                os.kill(pid, signal.SIGKILL)
                if epoch is not None:
                    checker.server_kills[epoch] = upto
                recovered_s = svc.wait_recovered(role, pid, args.recover_timeout_s)
            if recovered_s is None:
                problems.append("not recovered")
            integrity = checker.integrity()
            if integrity != "ok":
                problems.append(f"integrity {integrity!r}")
            lost, dup = checker.events(list(operator.acks))
            acked_lost = lost  # cumulative over every key acked so far
            if lost or dup:
                problems.append(f"acked events lost {lost}, stored twice {dup}")
            n, in_window, outside = checker.transitions(robots.snapshot(), upto)
            if outside:
                problems.append(f"transitions lost outside a commit interval {outside}")
            r_lost, r_altered = checker.reports(robots.acked_reports())
            if r_lost or r_altered:
                problems.append(f"acked reports lost {r_lost}, altered {r_altered}")
            line = (
                f"kill {i + 1:3d}/{kills} {role:8s} pid {pid}: recovered "
                f"{'-' if recovered_s is None else f'{recovered_s:.1f} s'} | integrity "
                f"{integrity} | acked events {len(operator.acks)} lost {lost} | acked reports "
                f"lost {r_lost} | replies checked {n}, lost in window {in_window}, outside "
                f"{outside}"
            )
            if role == DATABASE:
                line += (
                    f" | down {db.outage_s:.1f} s, replies not yet committed at the kill "
                    f"{len(db.pending)}, served meanwhile {len(db.held - db.pending)}, of these "
                    f"lost {len(db.held & set(checker.lost_outside))}, "
                    f"failed requests {db.errors or 0}, roles restarted {db.restarted or 0}"
                )
            if role == "learn":
                v, ok = checker.checkpoint()
                unrestorable += not ok
                line += f" | newest version {v} restores {ok}"
                if not ok:
                    problems.append(f"version {v} unrestorable")
            if role == "serve" and recovered_s is not None and epoch is not None:
                first = first_reply_after(robots, epoch, 15.0)
                got = None if first is None else first.version
                line += f" | newest on disk {newest_before}, first reply after restart v{got}"
                if got is None or (newest_before is not None and got < newest_before):
                    problems.append(f"served v{got} < newest v{newest_before}")
            done += 1
            if not problems:
                survived += 1
            else:
                line += " | FAILED: " + "; ".join(problems)
            print(line, flush=True)
        for j in range(daemon_kills if not _FINISH.is_set() else 0):
            if _FINISH.wait(rng.uniform(args.interval_min_s, args.interval_max_s)):
                daemon_kills = j
                break
            ok, orphans, served = kill_daemon(svc, robots, operator, checker, args, j, daemon_kills)
            daemon_survived += ok
            orphans_total += orphans
            orphan_replies += served
            daemon_done += 1
            if svc.daemon.proc.poll() is not None:
                break  # not restarted: nothing more to kill
    finally:
        robots.close()
        operator.close()
        daemon_rc = svc.daemon.close()
    # Final accounting, the daemon stopped (every role flushed).
    t_end = time.monotonic()
    integrity = checker.integrity()
    acked_lost, acked_twice = checker.events(list(operator.acks))
    checker.transitions(robots.snapshot(), t_end)
    reports_lost, reports_altered = checker.reports(robots.acked_reports())
    v, ok = checker.checkpoint()
    unrestorable_final = not ok
    replies = robots.snapshot()
    lat = np.array(robots.latencies_ms) if robots.latencies_ms else np.zeros(1)
    figures = {
        "kills": kills,
        "survived": survived,
        "acked_events_lost": acked_lost,
        "transitions_duplicated": checker.duplicated,
        "checkpoints_unrestorable": unrestorable + unrestorable_final,
        "kills_by_role": by_role,
        "daemon_kills": daemon_done,
        "daemon_kills_survived": daemon_survived,
        "orphans_after_daemon_kill": orphans_total,
        "replies_from_orphans": orphan_replies,
        "acked_reports": len(robots.acked_reports()),
        "acked_reports_lost": reports_lost,
        "acked_reports_altered": reports_altered,
        "acked_events": len({a["idempotency_key"] for a in operator.acks}),
        "acked_events_stored_twice": acked_twice,
        "replies": len(replies),
        "transitions_lost_in_commit_window": checker.lost_in_window,
        "transitions_lost_outside_window": len(checker.lost_outside),
        "max_loss_window_ms": round(checker.max_loss_window_ms, 1),
        "commit_window_ms": round(checker.window_s * 1e3, 1),
        "robot_failures": robots.failures,
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "final_integrity": integrity,
        "final_version": v,
        "daemon_rc": daemon_rc,
        "wall_s": round(t_end - t_start, 1),
    }
    if cluster is not None:
        errors = [db.errors for db in outages]
        rec = [db.recovered_s for db in outages]
        figures |= {
            "backend": "postgres",
            "db_outages": len(outages),
            "db_outage_s": [round(db.outage_s, 2) for db in outages],
            "db_recovered_max_s": (
                None if not rec or None in rec else round(max(rec), 1)  # type: ignore[type-var]
            ),
            "db_pending_at_kill": sum(len(db.pending) for db in outages),
            "db_outage_replies": sum(len(db.held - db.pending) for db in outages),
            # Both kinds only in the writer's memory while the database was away: none may be lost.
            "db_held_replies_lost": len(
                set().union(*(db.held for db in outages)) & set(checker.lost_outside)
            ),
            "db_outage_overloaded": sum(
                n for e in errors for c, n in e.items() if c.endswith(" overloaded")
            ),
            "db_outage_infer_timeouts": sum(e.get("infer timeout", 0) for e in errors),
            "db_outage_report_timeouts": sum(e.get("report timeout", 0) for e in errors),
            "db_outage_other_errors": sum(
                n
                for e in errors
                for c, n in e.items()
                if not c.endswith((" overloaded", " timeout"))
            ),
            "roles_restarted_by_db_kill": sum(len(db.restarted) for db in outages),
        }
    print(
        f"chaos: kills survived {survived}/{kills}, acknowledged events lost {acked_lost} "
        f"(of {figures['acked_events']}), transitions duplicated {checker.duplicated}, "
        f"checkpoints unrestorable {figures['checkpoints_unrestorable']}; daemon kills "
        f"survived {daemon_survived}/{daemon_done} (children still running after each: "
        f"{orphans_total} in all); acknowledged reports lost {reports_lost}, altered "
        f"{reports_altered} (of {figures['acked_reports']}); transitions lost "
        f"within a killed server's commit interval {checker.lost_in_window} over "
        f"{by_role['serve']} server kills (widest {figures['max_loss_window_ms']} ms before the "
        f"kill, allowed {figures['commit_window_ms']} ms), outside it "
        f"{len(checker.lost_outside)}; robot request failures "
        f"{robots.failures} of {len(replies) + robots.failures}; final integrity {integrity}; "
        f"daemon exit {daemon_rc}; {figures['wall_s']} s",
        flush=True,
    )
    if cluster is not None:
        print(
            f"chaos: PostgreSQL killed {len(outages)} times (down "
            f"{', '.join(f'{x:.1f}' for x in figures['db_outage_s'])} s): robots served "
            f"{figures['db_outage_replies']} replies during the outages (and "
            f"{figures['db_pending_at_kill']} replied but not yet committed at a kill): "
            f"{figures['db_held_replies_lost']} of them lost; answered "
            f"overloaded {figures['db_outage_overloaded']}, infer requests unanswered "
            f"{figures['db_outage_infer_timeouts']}, reports acknowledged too late for the "
            f"client's timeout {figures['db_outage_report_timeouts']}; roles restarted "
            f"{figures['roles_restarted_by_db_kill']}",
            flush=True,
        )
    return figures


def main(args: Args) -> None:
    # SIGTERM (a test's timeout, Ctrl-C's cousin) unwinds through `run`'s finally: the daemon
    # runs in its own session and would otherwise outlive this script.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGUSR1, lambda *_: _FINISH.set())
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
