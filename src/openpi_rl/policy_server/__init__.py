"""Policy server (`openpi-rl serve`): answers robots' action requests over ZeroMQ (and openpi's
WebSocket protocol) from one live `PolicySnapshot`, batching concurrent robots, logs every
served chunk and report to the replay, and hot-swaps to the learner's versions. Talks to:
robots (client/, openpi-client), the replay, the learner (version notices, health), the
operator (`openpi-rl admin`).
"""

from openpi_rl.policy_server.metrics import ServerMetrics
from openpi_rl.policy_server.snapshot import (
    PolicySnapshot,
    Sampled,
    example_observation,
    padded_sizes,
)

__all__ = ["PolicySnapshot", "Sampled", "ServerMetrics", "example_observation", "padded_sizes"]
