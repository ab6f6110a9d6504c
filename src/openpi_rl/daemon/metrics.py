"""The learner process's Prometheus metrics, defined once (`openpi_rl_learner_<what>_<unit>`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self.refused = Counter(
            "openpi_rl_learner_refused_updates_total",
            "Updates not published (non-finite loss/gradients/weights, or KL past the limit)",
            ["reason"],
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
