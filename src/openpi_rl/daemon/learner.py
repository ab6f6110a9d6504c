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

This module owns the `Learner` (its start, one poll of the replay, the update with its guard,
publishing, the turn every process plays) and `learn()`, the command's entry point. The other
roles of the one `Learner` are mixins in their own modules: resuming and saving versions
versions_io.py's, the operator's rollbacks and pauses operator_decisions.py's, the process
loop (`run`, the other processes' `follow`, `close`) process.py's, the critic warm-up
warmup.py's. Its config is config.py's, the batch it trains on (which segments, how packed)
batch.py's, the learning curves each learn step writes (TensorBoard, W&B) curves.py's.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time

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
from openpi_rl.daemon.operator_decisions import OperatorDecisions
from openpi_rl.daemon.process import LearnerProcess
from openpi_rl.daemon.replay_source import ReplaySource, Segment
from openpi_rl.daemon.update import DataParallel
from openpi_rl.daemon.versions_io import VersionsIO
from openpi_rl.daemon.warmup import CriticWarmup, WarmupState
from openpi_rl.models.choice import ModelConfigError
from openpi_rl.models.finetune import resolve_finetune, trainable
from openpi_rl.replay import ReplayFormatError, store
from openpi_rl.rl.ppo import make_optimizer
from openpi_rl.sdnotify import config_error
from openpi_rl.weights.notices import Publisher, ServerWatch, notice_endpoint
from openpi_rl.weights.operator_state import OperatorState
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


class Learner(VersionsIO, OperatorDecisions, LearnerProcess, CriticWarmup):
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

    def _play(self, turn: Turn) -> UpdateResult | None:
        """What a turn does on every process: the rollback it names, then its update."""
        if turn.rollback is not None:
            self._roll_back(*turn.rollback)
        if turn.batch is None:
            return None
        return self.update_on(turn.batch, turn.transitions)

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
