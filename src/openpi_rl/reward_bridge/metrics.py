"""Prometheus metrics of the reward bridge, defined once (openpi_rl_bridge_<what>_<unit>)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class BridgeMetrics:
    """One registry per bridge object, so tests can run several bridges in one process."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "openpi_rl_bridge_connections", "Open pendant connections.", registry=r
        )
        self.events = Counter(
            "openpi_rl_bridge_events_total",
            "Feedback events committed, by kind and credit status (attached, unknown_robot, ...).",
            ["kind", "status"],
            registry=r,
        )
        self.unattached = Counter(
            "openpi_rl_bridge_events_unattached_total",
            "Events stored without a transition (unknown robot or episode, no live transition).",
            ["status"],
            registry=r,
        )
        self.duplicates = Counter(
            "openpi_rl_bridge_events_duplicate_total",
            "Resent events (idempotency key already stored), acknowledged without a new row.",
            registry=r,
        )
        self.errors = Counter(
            "openpi_rl_bridge_errors_total", "Error replies by code.", ["code"], registry=r
        )
        self.auth_failures = Counter(
            "openpi_rl_bridge_auth_failures_total", "Refused tokens.", ["endpoint"], registry=r
        )
        self.rate_limited = Counter(
            "openpi_rl_bridge_rate_limited_total",
            "Frames refused for a connection over its rate limit, by endpoint.",
            ["endpoint"],
            registry=r,
        )
        self.refused_connections = Counter(
            "openpi_rl_bridge_refused_connections_total",
            "Connections refused for being over max_connections, by port (ws, http).",
            ["port"],
            registry=r,
        )
        self.ack_seconds = Histogram(
            "openpi_rl_bridge_ack_seconds",
            "From receiving an event to acknowledging it (after its commit).",
            buckets=(1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.queries = Counter(
            "openpi_rl_bridge_queries_total",
            "Reward queries from HumanRewardWebSocket/HTTP, by outcome (answered, timeout).",
            ["outcome"],
            registry=r,
        )
        self.frames = Counter(
            "openpi_rl_bridge_frames_total",
            "Camera frames made for the pendants, by outcome (images, no_image, unreadable).",
            ["outcome"],
            registry=r,
        )
        self.frames_dropped = Counter(
            "openpi_rl_bridge_frames_dropped_total",
            "Frames not sent to a pendant that had messages waiting (the next frame replaces it).",
            registry=r,
        )
        self.replay_queue_depth = Gauge(
            "openpi_rl_bridge_replay_queue_depth", "Events waiting for their commit.", registry=r
        )
