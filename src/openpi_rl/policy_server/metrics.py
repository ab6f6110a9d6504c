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
