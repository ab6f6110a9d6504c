"""`Learner`: PPO on the replay's data, one checkpointed and published version per update.

    replay (read-only + `consumed` flag) -> segments -> ChunkBatch -> learn step (values, GAE
    over chunks, fused PPO + BC, on all devices) -> guard -> orbax version -> PUB notice

Guarantees it keeps: the PPO ratio uses the behaviour log-prob stored at serving time; data
more than `max_policy_lag` versions old is dropped and counted (4); an update with non-finite
loss, gradients or weights, or whose KL(before || after) passes `max_kl`, is not published,
and is logged and counted (5); versions are written atomically by orbax and the learner resumes
from the newest complete one (2). Data is marked consumed after its update was published (or
refused): a learner killed in between trains on it once more, never loses it.

On start the learner resumes from the newest version that verifies (its content hash) and
restores; a corrupt newer one is skipped, logged and counted, and its number is never reused.
The operator's decisions (operator_state.py, written by the policy server's admin) are read at
start and between updates: a rollback the learner has not applied yet makes it continue from
the rollback target's weights and optimiser state (the next version is still newest + 1, so
the version rolled back from stays behind for good); a persisted pause holds updates even while
no server answers.

What trains is `finetune`'s choice (models/finetune.py): every weight, or LoRA adapters + the
value head (the base frozen, optimizer state only for what trains). A LoRA learner's versions
after its base (version 0) hold only those arrays and name the base (weights/versions.py). The
first `critic_warmup_updates` updates train the value head alone and publish nothing
(warmup.py).

Several learner processes (`[learn.distributed]`, distributed.py) are one learner: process 0
does all of the above but the update and the saves, which every process takes part in; the
others `follow` the turns it sends them (lockstep.py): a rollback, a batch to train on, stop.

This module owns the `Learner` process (resume, operator state, update, publish, run/close);
its config is config.py's, the batch it trains on (which segments, how packed) batch.py's, the
learning curves each learn step writes (TensorBoard, W&B) curves.py's.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import structlog
from flax import nnx
from prometheus_client import start_http_server

from openpi_rl.curves import CurvesConfigError
from openpi_rl.daemon.batch import ChunkBatch, build_batch, usable_segments
from openpi_rl.daemon.config import LearnerConfig
from openpi_rl.daemon.curves import LearnerCurves
from openpi_rl.daemon.distributed import DistributedConfigError, initialize, peer_lost
from openpi_rl.daemon.lockstep import Lockstep, Turn
from openpi_rl.daemon.metrics import LearnerMetrics
from openpi_rl.daemon.replay_source import ReplaySource, Segment
from openpi_rl.daemon.update import DataParallel
from openpi_rl.daemon.warmup import CriticWarmup, WarmupState
from openpi_rl.models.choice import ModelConfigError
from openpi_rl.models.finetune import resolve_finetune, trainable
from openpi_rl.replay import ReplayFormatError, store
from openpi_rl.rl.ppo import make_optimizer
from openpi_rl.sdnotify import Notifier, config_error
from openpi_rl.weights.notices import Publisher, ServerWatch, notice_endpoint
from openpi_rl.weights.operator_state import OperatorState, load_state, state_path
from openpi_rl.weights.start import build_start
from openpi_rl.weights.versions import VersionCheckpoints

log = structlog.get_logger("openpi_rl.learner")


@dataclasses.dataclass
class UpdateResult:
    version: int  # the learner's version after the update (unchanged when refused)
    published: bool
    reason: str | None  # why not published: "nonfinite" or "kl" (refused), "unchanged"
    metrics: dict[str, float]
    path: str | None = None
    transitions: int = 0
    warmup: bool = False  # a critic warm-up update: value head only, saved aside, not published


class Learner(CriticWarmup):
    """Built from a LearnerConfig; `run()` blocks until `close()` (from any thread) or
    `max_updates`; `step()` is one poll (tests drive it directly)."""

    def __init__(self, config: LearnerConfig, devices: list[jax.Device] | None = None):
        self.config = config
        # Several processes (distributed.py): process 0 reads the replay, decides each turn and
        # publishes; the others `follow` it through every update and save (lockstep.py).
        self.lockstep = Lockstep()
        self.primary = self.lockstep.primary
        self.metrics = LearnerMetrics()
        if self.primary:
            self.metrics.watch_replay(config.replay_dir)
        self.ac = build_start(config.model, config.value_hidden, config.seed)
        self.obs_spec = config.model.obs_spec
        self.action_shape = (config.model.action_horizon, config.model.action_dim)
        self.dp = DataParallel(config.ppo, devices, config.distributed.fsdp_min_size)
        self.num_segments = math.ceil(config.batch_segments / self.dp.size) * self.dp.size
        self.finetune = resolve_finetune(self.ac, config.finetune)  # "full" or "lora"
        self.trainable = trainable(self.finetune)
        self.graphdef, params, self.rest = nnx.split(self.ac, self.trainable, ...)
        opt_state = make_optimizer(config.ppo).init(params)
        if config.critic_warmup_updates < 0:
            raise ModelConfigError(
                f"critic_warmup_updates: expected an int >= 0, got {config.critic_warmup_updates}"
            )
        self.counters = dict.fromkeys(
            (
                "updates",
                "refused_nonfinite",
                "refused_kl",
                "transitions_trained",
                "transitions_stale",
                "transitions_refused",
                "transitions_skipped",
                "corrupt_versions",
                "critic_warmup_updates",
                "unchanged_updates",
            ),
            0,
        )
        self.checkpoints = VersionCheckpoints(config.checkpoint_dir, config.keep_versions)
        self.rollback_id = 0  # the newest operator rollback applied (kept in each version's meta)
        self.version = 0
        self.base: int | None = None  # "lora": the full version the next versions apply to
        # Global arrays from here on, laid out over every device: what orbax saves from
        # several processes, and what it restores into (each process reads its shards).
        self._set_from(nnx.state(self.ac), opt_state)
        self.version, opt_state = self._resume(self.opt_state)
        self.warmup = WarmupState(config.checkpoint_dir)
        self.critic_opt_state = self._resume_warmup()
        self._operator_mtime: int | None = None
        self.operator = OperatorState()
        self._set_from(nnx.state(self.ac), opt_state)
        self.key = jax.random.key(config.seed)
        self._source: ReplaySource | None = None
        self._unmarked: list[int] = []  # trained on, not marked consumed yet (database away)
        # close() on run's own thread (a signal handler) sets only `_closing`, a plain flag
        # `run` polls: `Event.set` there deadlocks if the signal landed while run's
        # `Event.wait` held the event's lock. Other threads also set `_wake` (no wait).
        self._closing = False
        self._wake = threading.Event()
        self._run_thread: int | None = None  # run's thread while it runs: it releases on exit
        self._run_ended = threading.Event()
        self._closed = False
        # Several processes and one is gone: release only this process's own parts (`_release`).
        self._group_lost = False
        # The operator's rollback due at start: process 0 reads it, every process applies it.
        if self.primary:
            self._play(self.lockstep.send(Turn(rollback=self._rollback_due())))
        else:
            self._play(self.lockstep.receive())
        self.metrics.version.set(self.version)
        if not self.primary:
            return  # the replay, sockets, curves and metrics are process 0's

        # Before the sockets: W&B turned on without wandb installed stops here (EX_CONFIG).
        self.curves = LearnerCurves(config)
        endpoint = notice_endpoint(config.publish_endpoint, self.checkpoints.directory)
        self.publisher = Publisher(
            endpoint, config.heartbeat_s, curve_secret_key_file=config.publish_curve_secret_key_file
        )
        # Heartbeats carry the newest version: a server that missed its notice catches up.
        self.publisher.version = self.version
        self.servers = ServerWatch(
            config.server_endpoints, timeout_s=config.server_timeout_s,
            registry=self.metrics.registry,
        )  # fmt: skip

    def _resume(self, opt_state: Any) -> tuple[int, Any]:
        """(version number, optimiser state) to go on from; updates `self.ac` and counters.
        The newest version that verifies and restores wins; a corrupt newer one is skipped
        (logged, counted) and its number not reused. None on disk: version 0 is saved."""
        versions = self.checkpoints.versions()
        if not versions:
            self._save(0, opt_state, self._meta())
            return 0, opt_state  # what the server serves before any update
        corrupt = 0
        for version in reversed(versions):
            try:
                weights, restored, meta = self.checkpoints.restore(
                    version, nnx.state(self.ac), opt_state
                )
            except Exception as e:  # CorruptVersion, or orbax could not read it
                corrupt += 1
                self.metrics.corrupt_versions.inc()
                log.error(
                    "learner.version_corrupt", version=version, error=str(e),
                    path=str(self.checkpoints.path(version)),
                )  # fmt: skip
                continue
            nnx.update(self.ac, weights)
            self._based_on(version)
            self.counters.update({k: int(v) for k, v in meta.get("counters", {}).items()})
            self.counters["corrupt_versions"] += corrupt
            self.rollback_id = int(meta.get("rollback_id", 0))
            log.info(
                "learner.resumed", version=versions[-1], weights_of=version,
                path=str(self.checkpoints.path(version)), skipped_corrupt=corrupt,
            )  # fmt: skip
            return versions[-1], restored
        self.counters["corrupt_versions"] += corrupt
        log.error("learner.no_version_restores", versions=versions, start="seed weights")
        return versions[-1], opt_state

    def _based_on(self, version: int) -> None:
        """The learner now holds `version`'s weights: a LoRA learner's next versions are deltas
        over that version's base (or over it, a full version)."""
        if self.finetune == "lora":
            base = self.checkpoints.base_of(version)
            self.base = version if base is None else base

    def _save(self, version: int, opt_state: Any, meta: dict[str, Any]) -> Path:
        """Save `version`: with LoRA and a base on disk, only what trains (a delta)."""
        if self.finetune == "lora" and self.base is not None and self.base != version:
            weights = nnx.state(self.ac, self.trainable)
            return self.checkpoints.save(version, weights, opt_state, meta, base=self.base)
        path = self.checkpoints.save(version, nnx.state(self.ac), opt_state, meta)
        if self.finetune == "lora":
            self.base = version  # full weights on disk: the next versions apply to these
        return path

    def _set_from(self, weights: nnx.State, opt_state: Any) -> None:
        """Hold `weights` and `opt_state`, as global arrays laid out for the update (`self.ac`
        too: its state is what versions save)."""
        nnx.update(self.ac, weights)
        _, params, rest = nnx.split(self.ac, self.trainable, ...)
        self.params, self.rest = self.dp.put_state(params), self.dp.put_replicated(rest)
        self.opt_state = self.dp.put_state(opt_state)
        nnx.update(self.ac, self.params, self.rest)

    def check_operator(self) -> None:
        """Re-read the operator's state file when it changed (a stat per call); apply a
        rollback not applied yet: train on from its target's weights and optimiser state.
        Process 0's: the other processes apply the rollback it sends them."""
        due = self._rollback_due()
        if due is not None:
            self._play(self.lockstep.send(Turn(rollback=due)))

    def _rollback_due(self) -> tuple[int, int] | None:
        """(target, rollback id) of an operator rollback not applied yet, when the operator's
        state file changed; None otherwise."""
        path = state_path(self.checkpoints.directory)
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._operator_mtime:
            return None
        self._operator_mtime = mtime
        self.operator = load_state(self.checkpoints.directory)
        op = self.operator
        if op.rollback_target is None or op.rollback_id <= self.rollback_id:
            return None
        return op.rollback_target, op.rollback_id

    def _roll_back(self, target: int, rollback_id: int) -> None:
        """Train on from version `target`'s weights and optimiser state (every process)."""
        self.rollback_id = rollback_id  # applied once, whatever comes of it
        try:
            # The live state as the target: restored arrays come laid out as the live ones.
            weights, opt_state, _ = self.checkpoints.restore(
                target, nnx.state(self.ac), self.opt_state
            )
        except Exception as e:
            log.error(
                "learner.rollback_unreadable", target=target, error=str(e), version=self.version
            )
            return
        self._set_from(weights, opt_state)
        self._based_on(target)
        self.metrics.rollbacks.inc()
        log.warning(
            "learner.rolled_back", target=target, version=self.version,
            next_version=self.version + 1, rollback_id=rollback_id,
        )  # fmt: skip

    def _play(self, turn: Turn) -> UpdateResult | None:
        """What a turn does on every process: the rollback it names, then its update."""
        if turn.rollback is not None:
            self._roll_back(*turn.rollback)
        if turn.batch is None:
            return None
        return self.update_on(turn.batch, turn.transitions)

    def follow(self) -> int:
        """A process other than 0: play process 0's turns until it stops (a `close()` here
        waits for that: every update and save needs every process)."""
        self._run_thread = threading.get_ident()
        self._run_ended.clear()
        log.info(
            "learner.following", process=jax.process_index(), processes=jax.process_count(),
            version=self.version, devices=self.dp.size, local_devices=self.dp.local_size,
        )  # fmt: skip
        # READY=1 once joined and resumed; WATCHDOG=1 per turn (process 0 sends one at least
        # every poll interval, and one per update: the watchdog limit must cover an update).
        notifier = Notifier()
        notifier.ready(status=f"following process 0, version {self.version}")
        try:
            while not (turn := self.lockstep.receive()).stop:
                notifier.watchdog()
                self._play(turn)
        except jax.errors.JaxRuntimeError:
            self._group_lost = True  # a collective failed: process 0 is gone (`learn` exits)
            raise
        finally:
            self._release()
            self._run_thread = None
            self._run_ended.set()
        return 0

    # -- one poll

    def source(self) -> ReplaySource | None:
        """The replay reader, opened once the server has created the store."""
        if self._source is None:
            try:
                self._source = ReplaySource(self.config.replay_dir)
            except FileNotFoundError:
                return None
            except ReplayFormatError as e:
                if not e.older:
                    raise
                # An older format: the policy server migrates it when it opens it.
                log.warning("learner.replay_awaits_migration", error=str(e))
                return None
        return self._source

    @property
    def min_version(self) -> int:
        return self.version - self.config.max_policy_lag

    def step(self) -> UpdateResult | None:
        """Read the replay; when enough data is ready, run one update on it (published or
        refused) and mark that data consumed. None: not enough data yet."""
        t0 = time.perf_counter()
        try:
            self._mark_trained()  # before the next collect, or that data would train again
            taken = self.take()
        except store.unavailable_errors() as e:
            # The replay's database is away (restarting, the network): wait a turn and read
            # again; its connections reconnect on their next query.
            log.warning("learner.replay_unavailable", error=f"{e!r:.300}")
            taken = None
        if taken is None:
            self.lockstep.send(Turn())  # the other processes wait for the next turn
            return None
        batch, segments = taken
        self.publisher.set_state("training")
        ids = [i for s in segments for i in s.ids]
        trained_on = self.version
        result = self._play(self.lockstep.send(Turn(batch=batch, transitions=len(ids))))
        assert result is not None
        self._unmarked = ids
        try:
            self._mark_trained()
        except store.unavailable_errors() as e:  # marked on the next turn
            log.warning("learner.replay_unavailable", error=f"{e!r:.300}")
        # Which robots fed this update (a fleet: is every server's data trained?).
        robots: dict[str, int] = {}
        for s in segments:
            robots[s.robot_id] = robots.get(s.robot_id, 0) + len(s)
        log.info(
            "learner.trained_on", version=result.version, published=result.published,
            reason=result.reason, robots=robots,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        self.metrics.update_seconds.observe(seconds)
        self.curves.record(
            self.learn_steps, result.metrics, result.version, segments, batch, trained_on, seconds
        )
        self.publisher.set_state("waiting")
        return result

    def _mark_trained(self) -> None:
        if self._unmarked:
            self._source.mark_consumed(self._unmarked)
            self._unmarked = []

    @property
    def learn_steps(self) -> int:
        """Learn steps made so far: published, refused, unchanged and critic warm-up updates (the
        learning curves' x axis)."""
        c = self.counters
        return (
            c["updates"] + c["critic_warmup_updates"] + c["refused_nonfinite"] + c["refused_kl"]
            + c["unchanged_updates"]
        )  # fmt: skip

    def take(self) -> tuple[ChunkBatch, list[Segment]] | None:
        """The next training batch and the segments in it (oldest first), once at least
        `min_transitions` chunks are ready; stale and unreadable data is marked consumed here."""
        c = self.config
        source = self.source()
        if source is None:
            return None
        collected = source.collect(self.min_version, c.segment_length, c.settle_s)
        if collected.stale_ids:
            n = source.mark_consumed(collected.stale_ids)
            self._count("stale", n)
            log.info("learner.dropped_stale", transitions=n, min_version=self.min_version)
        # Counted over everything pending, not the batch: columns of short episodes may hold
        # fewer than `min_transitions` chunks however much waits, and the learner would wait on.
        if sum(len(s) for s in collected.segments) < c.min_transitions:
            return None
        segments = collected.segments[: self.num_segments]
        used, skipped, observation = usable_segments(source, segments, self.obs_spec)
        if skipped:
            self._count("skipped", source.mark_consumed(skipped))
        if not used:
            return None
        batch = build_batch(
            used, observation, self.obs_spec, self.action_shape, c.segment_length,
            self.num_segments,
        )  # fmt: skip
        return batch, used

    def update_on(self, batch: ChunkBatch, transitions: int = 0) -> UpdateResult:
        """One learn step on a built batch; publish the new version unless the guard refuses.
        transitions: how many chunks the batch holds, counted as trained or refused.
        During the critic warm-up, a value-only update (saved aside, not published)."""
        if self.critic_opt_state is not None:  # value head only, not published (warmup.py)
            m, refused = self._warm_up(batch, transitions)
            warm = UpdateResult(self.version, False, None, m, transitions=transitions, warmup=True)
            return refused or warm
        key = jax.random.fold_in(self.key, self.version)
        params, opt_state, metrics = self.dp(
            self.graphdef, self.params, self.rest, self.opt_state, key, self.dp.share(batch)
        )
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        refused = self._guard(m, transitions)
        if refused is not None:
            return refused
        if m.get("update_fraction", 1.0) == 0.0:
            return self._unchanged(transitions)

        self.params, self.opt_state = params, opt_state
        nnx.update(self.ac, params)
        self.version += 1
        self.counters["updates"] += 1
        self._count("trained", transitions)  # before the save: the version's meta includes it
        path = self._save(self.version, self.opt_state, self._meta(m))
        if self.primary:
            self.publisher.publish(self.version)
        self.metrics.updates.inc()
        self.metrics.version.set(self.version)
        self.metrics.batch_reward.set(m["reward_mean"])
        self.metrics.update_kl.set(m["update_kl"])
        for stat, value in m.items():
            self.metrics.ppo.labels(stat).set(value)
        log.info(
            "learner.published", version=self.version, path=str(path),
            reward_mean=round(m["reward_mean"], 4), loss=round(m["loss"], 4),
            update_kl=round(m["update_kl"], 5), explained_variance=round(m["explained_variance"], 3),
        )  # fmt: skip
        return UpdateResult(self.version, True, None, m, str(path), transitions)

    def _guard(self, m: dict[str, float], transitions: int) -> UpdateResult | None:
        """The refusal (counted, logged) of an update with non-finite numbers or a KL past
        `max_kl`; None when it may go on."""
        reason = None
        if m["finite"] < 1.0:
            reason = "nonfinite"
        elif self.config.max_kl is not None and m["update_kl"] > self.config.max_kl:
            reason = "kl"
        if reason is None:
            return None
        self._count("refused", transitions)
        self.counters[f"refused_{reason}"] += 1
        self.metrics.refused.labels(reason=reason).inc()
        if self.primary:
            self.publisher.set_state("refused")
        log.warning(
            "learner.update_refused", reason=reason, version=self.version,
            loss=m["loss"], grad_norm=m["grad_norm"], update_kl=m["update_kl"],
            max_kl=self.config.max_kl,
        )  # fmt: skip
        return UpdateResult(self.version, False, reason, m, transitions=transitions)

    def _unchanged(self, transitions: int) -> UpdateResult:
        """`ppo.target_kl` stopped the update before its first step: the batch's behaviour was
        already that far from the policy (stale data). The weights are the live version's, so
        nothing is published: a version changing nothing would only age the data in flight."""
        self._count("stale", transitions)
        self.counters["unchanged_updates"] += 1
        log.info(
            "learner.unchanged", version=self.version, transitions=transitions,
            target_kl=self.config.ppo.target_kl,
        )  # fmt: skip
        return UpdateResult(self.version, False, "unchanged", {}, transitions=transitions)

    def _count(self, fate: str, n: int) -> None:
        self.counters[f"transitions_{fate}"] += n
        self.metrics.transitions.labels(fate=fate).inc(n)

    def _meta(self, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        finite = {k: v for k, v in (metrics or {}).items() if math.isfinite(v)}
        return {
            "version": self.version,
            "t_wall": time.time(),
            "counters": dict(self.counters),
            "rollback_id": self.rollback_id,
            "metrics": finite,
            "model": type(self.config.model).__name__,
        }

    # -- process

    def run(self) -> int:
        """Poll and update until `close()` or `max_updates` published updates; then release
        (what `close()` does) on its way out. A process other than 0 follows process 0's turns
        (`follow`) until it stops."""
        c = self.config
        if not self.primary:
            return self.follow()
        if self._closing:
            self._release()
            return 0
        self._run_thread = threading.get_ident()
        self._run_ended.clear()
        log.info(
            "learner.start", version=self.version, endpoint=self.publisher.endpoint,
            replay_dir=store.describe(c.replay_dir), devices=self.dp.size,
        )  # fmt: skip
        self.publisher.set_state("waiting")
        done = 0
        # READY=1: version 0 is saved or the newest version restored. WATCHDOG=1 between steps
        # only, so a stuck update silences it; the watchdog limit must cover one update.
        notifier = Notifier()
        notifier.ready(status=f"version {self.version}")
        failed = None
        try:
            while not self._closing:
                failed = self._dead_stage()
                if failed is not None:
                    log.error("learner.stage_failed", stage=failed, version=self.version)
                    self.publisher.set_state("failed")
                    break
                notifier.watchdog()
                if c.max_updates is not None and done >= c.max_updates:
                    break
                self.check_operator()
                if self._paused():
                    self.lockstep.send(Turn())  # the other processes wait for the next turn
                    self._wake.wait(0.1)
                    continue
                result = self.step()
                if result is None:
                    self._wake.wait(min(c.poll_interval_s, 0.25))
                elif result.published:
                    done += 1
        except jax.errors.JaxRuntimeError:
            # A collective failed (the stop turn would too, or hang): another process is gone.
            self._group_lost = self.lockstep.processes > 1
            raise
        finally:
            self._release()
            self._run_thread = None
            self._run_ended.set()
        return 0 if failed is None else 1  # non-zero: the supervisor restarts the learner

    def _dead_stage(self) -> str | None:
        """The learner's threads beside `run`: the heartbeat (servers follow it) and the
        server watches (pauses come through them). One that died ends `run` with 1."""
        if self.publisher.died():
            return "heartbeat"
        if self.servers.died():
            return "server watch"
        return None

    @property
    def paused(self) -> bool:
        """Whether learning is paused now: by a server's operator or the persisted switch."""
        return self.servers.paused or self.operator.learning_paused

    def _paused(self) -> bool:
        """An operator paused learning on a server (`openpi-rl admin pause-learning`): no new
        update starts until it is resumed; the heartbeat's state says so. The persisted switch
        counts too: a pause holds while the server is down or restarting."""
        paused = self.paused
        if paused != (self.publisher.state == "paused"):
            self.publisher.set_state("paused" if paused else "waiting")
            log.info(
                "learner.paused" if paused else "learner.resumed_learning", version=self.version
            )
        return paused

    def close(self) -> None:
        """Stop `run` after the current step, finish pending checkpoint writes, close sockets
        and the replay. Idempotent, from any thread: while `run` runs on another thread, it
        returns once `run` has released everything. On `run`'s own thread (a signal handler)
        it only sets a flag and takes no lock: `run` returns after the current step and
        releases on its way out (a lock taken there could be the one the interrupted `run`
        holds: a learner that never stops, killed at the timeout)."""
        self._closing = True
        running = self._run_thread
        if running is not None:
            if running != threading.get_ident():
                self._wake.set()
                self._run_ended.wait()
            return
        self._release()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A lost group: no stop turn, and no wait for a save that needs the dead process (each
        # would fail or hang till the heartbeat timeout); what it left is skipped on resume.
        lost = self._group_lost
        if not self.primary:
            if not lost:
                self.checkpoints.close()
                self.warmup.close()
            return
        if not lost:
            self.lockstep.send(Turn(stop=True))  # the other processes return from `follow`
        self.publisher.set_state("failed" if lost else "stopping")
        self.servers.close()
        if not lost:
            self.checkpoints.close()
            self.warmup.close()
        self.publisher.close()
        if self._source is not None:
            self._source.close()
        self.curves.close()
        log.info("learner.stopped", version=self.version, **self.counters)


def learn(config: LearnerConfig) -> int:
    """`openpi-rl learn`: run a Learner until SIGTERM / Ctrl-C (finish the current update,
    close, exit 0), with Prometheus /metrics on `metrics_port`. A model config that does not
    build exits EX_CONFIG (78), as does a `[learn.distributed]` that cannot work. Several
    processes: each runs this; process 0 serves /metrics and publishes, the others follow it
    and stop when it does; when one dies, the others exit EXIT_PEER_LOST (75) at once
    (distributed.py)."""
    cluster = None
    try:
        cluster = initialize(config.distributed)  # before the first device use: join the others
        learner = Learner(config)
    except (ModelConfigError, CurvesConfigError, DistributedConfigError) as e:  # e.g. a
        return config_error("learn", str(e))  # tokenizer file missing, or wandb not installed
    except jax.errors.JaxRuntimeError as e:  # a collective of the start (resume, rollback)
        if cluster is None or cluster.num_processes < 2:
            raise
        peer_lost(e, cluster.process_id, stage="start")
    if learner.primary and config.metrics_port is not None:
        start_http_server(
            config.metrics_port, config.metrics_host, registry=learner.metrics.registry
        )
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: learner.close())
    try:
        return learner.run()
    except jax.errors.JaxRuntimeError as e:
        if learner.lockstep.processes < 2:
            raise
        # Exit now, EXIT_PEER_LOST: a plain exit would wait for the dead process (distributed.py).
        peer_lost(e, jax.process_index(), version=learner.version)
