"""The learner process's Prometheus metrics, defined once (`openpi_rl_learner_<what>_<unit>`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from openpi_rl.replay import ReplayReader

log = structlog.get_logger("openpi_rl.learner")


class LearnerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.version = Gauge(
            "openpi_rl_learner_version", "Newest published policy version", registry=r
        )
        self.updates = Counter(
            "openpi_rl_learner_updates_total", "PPO updates published", registry=r
        )
        self.critic_warmup = Counter(
            "openpi_rl_learner_critic_warmup_updates_total",
            "Value-only updates of the critic warm-up (not published: the policy is unchanged)",
            registry=r,
        )
        self.refused = Counter(
            "openpi_rl_learner_refused_updates_total",
            "Updates not published (non-finite loss/gradients/weights, or KL past the limit)",
            ["reason"],
            registry=r,
        )
        self.corrupt_versions = Counter(
            "openpi_rl_learner_corrupt_versions_total",
            "Versions on disk that did not verify or restore when the learner resumed (skipped)",
            registry=r,
        )
        self.rollbacks = Counter(
            "openpi_rl_learner_rollbacks_total",
            "Operator rollbacks applied: training went on from the rollback target",
            registry=r,
        )
        self.transitions = Counter(
            "openpi_rl_learner_transitions_total",
            "Transitions read from the replay, by fate (trained, stale, refused, skipped)",
            ["fate"],
            registry=r,
        )
        self.update_seconds = Histogram(
            "openpi_rl_learner_update_seconds",
            "Wall time of one update (batch building, learn step, checkpoint, publish)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.batch_reward = Gauge(
            "openpi_rl_learner_batch_reward_mean", "Mean chunk reward of the last batch", registry=r
        )
        self.update_kl = Gauge(
            "openpi_rl_learner_update_kl", "KL(before || after) of the last update", registry=r
        )
        self.ppo = Gauge(
            "openpi_rl_learner_ppo_stat",
            "PPO statistics of the last published update (policy_loss, value_loss, entropy, "
            "approx_kl, clip_fraction, explained_variance, grad_norm, ...)",
            ["stat"],
            registry=r,
        )

    def watch_replay(self, replay_dir: str | Path) -> None:
        """Export the replay's size (`openpi_rl_replay_*`), read when Prometheus scrapes."""
        self.registry.register(ReplaySize(replay_dir))


class ReplaySize(Collector):
    """Rows and bytes of the replay store, from a connection opened per scrape (the learner's
    own connection belongs to its loop thread). A store not created yet, or a database that
    cannot be reached, reads 0."""

    def __init__(self, location: str | Path):
        self.location = location

    def describe(self) -> list:
        return []  # no scrape at registration: the store may not exist yet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows, size = 0, 0
        try:
            with contextlib.closing(ReplayReader(self.location)) as reader:
                stats = reader.stats()
                rows, size = stats.rows, stats.bytes_total
        except FileNotFoundError:
            pass  # no writer opened it yet
        except Exception as e:  # a scrape must not fail: the rest of the learner's metrics count
            log.warning("learner.replay_size_unreadable", error=f"{e!r:.200}")
        yield GaugeMetricFamily(
            "openpi_rl_replay_transitions", "Transitions stored in the replay", value=rows
        )
        yield GaugeMetricFamily(
            "openpi_rl_replay_bytes",
            "Bytes the replay takes (SQLite: index and segments; PostgreSQL: its tables)",
            value=size,
        )
