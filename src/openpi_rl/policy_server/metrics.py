"""Prometheus metrics of the policy server, defined once (openpi_rl_server_<what>_<unit>)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 0.1 ms: a loopback request's floor is ~0.2 ms; a large model's ~100 ms.
_LATENCY_BUCKETS = (
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class ServerMetrics:
    """One registry per server object, so tests can run several servers in one process."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "openpi_rl_server_request_seconds",
            "Time from receiving a request to sending its reply.",
            ["type"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "openpi_rl_server_requests_total", "Requests by message type.", ["type"], registry=r
        )
        self.errors = Counter(
            "openpi_rl_server_errors_total", "Error replies by code.", ["code"], registry=r
        )
        self.duplicates = Counter(
            "openpi_rl_server_duplicate_requests_total",
            "Resent requests (same robot and request_id) answered without serving them twice.",
            ["type"],
            registry=r,
        )
        self.batch_size = Histogram(
            "openpi_rl_server_batch_size",
            "Requests served by one model call.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.replay_queue_depth = Gauge(
            "openpi_rl_server_replay_queue_depth",
            "Transitions waiting for the replay writer.",
            registry=r,
        )
        self.policy_version = Gauge(
            "openpi_rl_server_policy_version", "Version of the live policy snapshot.", registry=r
        )
        self.ready = Gauge(
            "openpi_rl_server_ready", "1 once every batch size is compiled.", registry=r
        )
        self.compilations = Gauge(
            "openpi_rl_server_compilations",
            "Sampler executables compiled; constant after warm-up (a swap must not compile).",
            registry=r,
        )
        # Hot-swap (swapper.py); the gauges read the swapper's state when scraped.
        self.swaps = Counter(
            "openpi_rl_server_swaps_total", "Policy versions swapped in.", registry=r
        )
        self.swap_seconds = Histogram(
            "openpi_rl_server_swap_seconds",
            "Restore + warm-up of a new version, off the serving path.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.swap_failures = Counter(
            "openpi_rl_server_swap_failures_total",
            "Versions not swapped in (restore failed, other shapes, non-finite outputs).",
            ["reason"],
            registry=r,
        )
        self.rollbacks = Counter(
            "openpi_rl_server_rollbacks_total", "Rollbacks by trigger.", ["trigger"], registry=r
        )
        self.seconds_since_swap = Gauge(
            "openpi_rl_server_seconds_since_swap",
            "Seconds since the last swap (since start when none).",
            registry=r,
        )
        self.versions_behind = Gauge(
            "openpi_rl_server_versions_behind",
            "The learner's newest version minus the live one.",
            registry=r,
        )
        self.learner_up = Gauge(
            "openpi_rl_server_learner_up",
            "1 while the learner's heartbeats arrive (within swap.peer_timeout_s).",
            registry=r,
        )
        self.learner_heartbeat_age = Gauge(
            "openpi_rl_server_learner_heartbeat_age_seconds",
            "Seconds since the learner's last heartbeat (since start when none).",
            registry=r,
        )
        self.pinned_version = Gauge(
            "openpi_rl_server_pinned_version", "The pinned version; -1: following.", registry=r
        )
        self.learning_paused = Gauge(
            "openpi_rl_server_learning_paused",
            "1 while an operator has paused learning (the learner reads it from health).",
            registry=r,
        )
        # Hostile input (guarantee 6): what each listener refused before serving it.
        self.rate_limited = Counter(
            "openpi_rl_server_rate_limited_total",
            "Requests refused for a connection over its rate limit, by listener.",
            ["listener"],
            registry=r,
        )
        self.refused_connections = Counter(
            "openpi_rl_server_refused_connections_total",
            "Connections refused (over max_connections, wrong key), by listener and reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.rewards_clamped = Counter(
            "openpi_rl_server_rewards_clamped_total",
            "Reported rewards outside serve.reward_range, clamped into it.",
            registry=r,
        )
        self.admin_requests = Counter(
            "openpi_rl_server_admin_requests_total",
            "Admin requests by command and outcome.",
            ["command", "outcome"],
            registry=r,
        )
