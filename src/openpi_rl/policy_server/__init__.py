"""Policy server: answers robots' action requests over ZeroMQ (and openpi's WebSocket protocol)
from one live `PolicySnapshot`, micro-batching concurrent robots, and logs every served chunk to
the replay. Talks to: robots (client/), the replay store, and later the learner (hot-swap).

This slice holds the snapshot (padded-batch jitted sampler with warm-up) and the metrics; the
serving loop lands with the wire protocol and the replay store.
"""

from openpi_rl.policy_server.metrics import ServerMetrics
from openpi_rl.policy_server.snapshot import (
    PolicySnapshot,
    Sampled,
    example_observation,
    padded_sizes,
)

__all__ = ["PolicySnapshot", "Sampled", "ServerMetrics", "example_observation", "padded_sizes"]
